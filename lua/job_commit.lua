-- job_commit.lua: record a processed step -- cursor, processed count, last run time, retry count
-- reset -- only if the caller still holds the job's lease.
--
-- KEYS[1] job  pfx.."j:"..id
-- KEYS[2] guard pfx.."guard": never written, so no script of a migrating slot runs
-- ARGV[1] pfx
-- ARGV[2] job id
-- ARGV[3] owner      token from job_claim.lua
-- ARGV[4] has_cursor '1' when ARGV[5] is the new cursor, '0' for no cursor (None)
-- ARGV[5] cursor
-- ARGV[6] count      items processed in this step
-- ARGV[7] exhausted  '1' when the data source said done
-- ARGV[8] lease_ms   lease length from now
-- ARGV[9] step       number of this step within the claim: a re-sent commit (its first reply was
--                    lost to a connection error) is recognised and not counted twice
-- Derived keys: pfx.."due", pfx.."r:"..id.
-- Reply: 'ok' (keep going), 'lease_lost' (nothing saved: another worker owns the job), 'corrupt'
-- (nothing saved: its keys hold something else), or the
-- job's status when it was paused or cancelled meanwhile (saved; the caller must stop)
--- @include "now_ms"
--- @include "int"
--- @include "job_problem"
--- @include "job_owned"
--- @include "job_sample"

local job = KEYS[1]
local pfx, id, owner = ARGV[1], ARGV[2], ARGV[3]
if job_problem(ARGV[1], KEYS[1], ARGV[2]) then
  return 'corrupt'
end
if not job_owned(job, owner) then
  return 'lease_lost'
end
local now = now_ms()
local step = owner .. ':' .. ARGV[9]
if redis.call('HGET', job, 'step') ~= step then
  if ARGV[4] == '1' then
    redis.call('HSET', job, 'cursor', ARGV[5])
  else
    redis.call('HDEL', job, 'cursor')
  end
  local processed = redis.call('HINCRBY', job, 'processed', tonumber(ARGV[6]))
  redis.call('HSET', job, 'last_run_at', int(now), 'retries', 0, 'updated_at', int(now), 'step', step)
  if ARGV[7] == '1' then
    redis.call('HSET', job, 'exhausted', 1)
  end
  job_sample(pfx, id, processed, now)
end
local status = redis.call('HGET', job, 'status')
if status == 'running' then
  local until_ms = now + tonumber(ARGV[8])
  redis.call('HSET', job, 'lease_until', int(until_ms))
  redis.call('ZADD', pfx .. 'due', int(until_ms), id)
  return 'ok'
end
redis.call('HSET', job, 'owner', '')
redis.call('HDEL', job, 'lease_until')
return status
