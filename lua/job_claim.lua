-- job_claim.lua: lease runnable jobs of one iterator to a worker.
--
-- KEYS[1] due  pfx.."due"
-- KEYS[2] guard pfx.."guard": never written, so no script of a migrating slot runs
-- ARGV[1] pfx
-- ARGV[2] limit     claim at most this many jobs
-- ARGV[3] lease_ms  lease length; the entry is re-scored to now + lease_ms, so a job whose worker
--                   dies becomes runnable again when the lease runs out
-- ARGV[4] owner     random token of this claim (the fencing token every later write presents)
-- ARGV[5] worker    label of the worker (host:pid), shown by status
-- Derived keys: pfx.."j:"..id, pfx.."r:"..id, pfx.."status:*" of each job. A job whose keys hold
-- something else leaves the runnable set (its keys stay for inspection).
-- Reply: {next_due_ms, id, cursor, processed, retries, params, exhausted, overrides, ...}
--   next_due_ms  ms until the earliest remaining entry is runnable (0 = now, -1 = none; also
--                -1 when the runnable set itself holds something else)
--   then seven fields per claimed job (cursor is nil when the walk has not started; overrides
--   is the JSON of the job's own settings, '' when it has none)
--- @include "now_ms"
--- @include "int"
--- @include "wrong_type"
--- @include "next_due_ms"
--- @include "job_problem"
--- @include "job_set_status"
--- @include "job_sample"

local due = KEYS[1]
if wrong_type({due, 'zset'}) then
  return {-1}
end
local pfx = ARGV[1]
local limit = tonumber(ARGV[2])
local lease = tonumber(ARGV[3])
local owner, worker = ARGV[4], ARGV[5]
local now = now_ms()
local out = {0}
local taken = 0
local ids = redis.call('ZRANGEBYSCORE', due, '-inf', int(now), 'LIMIT', 0, limit + 10)
for _, id in ipairs(ids) do
  if taken >= limit then break end
  local job = pfx .. 'j:' .. id
  local bad = job_problem(pfx, job, id)
  local f = bad and {} or redis.call('HMGET', job, 'status', 'cursor', 'processed', 'retries', 'params',
    'exhausted', 'overrides')
  if bad or (f[1] ~= 'pending' and f[1] ~= 'running') then
    -- deleted, paused, finished: not runnable; keys holding something else: never runnable
    redis.call('ZREM', due, id)
  else
    if f[1] == 'pending' then
      job_set_status(pfx, id, job, 'pending', 'running', now)
    end
    if not redis.call('HGET', job, 'started_at') then
      redis.call('HSET', job, 'started_at', int(now))
    end
    redis.call('HSET', job, 'owner', owner, 'worker', worker, 'claimed_at', int(now),
      'lease_until', int(now + lease))
    redis.call('HDEL', job, 'next_run_at')
    redis.call('ZADD', due, int(now + lease), id)
    job_sample(pfx, id, tonumber(f[3] or '0'), now)
    taken = taken + 1
    table.insert(out, id)
    table.insert(out, f[2])
    table.insert(out, f[3] or '0')
    table.insert(out, f[4] or '0')
    table.insert(out, f[5] or 'null')
    table.insert(out, f[6] or '0')
    table.insert(out, f[7] or '')
  end
end
out[1] = next_due_ms(due, now)
return out
