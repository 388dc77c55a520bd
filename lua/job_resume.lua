-- job_resume.lua: make a paused or failed job runnable again, with its retry count reset. A worker
-- still inside the step during which the job was paused keeps its lease and carries on.
--
-- KEYS[1] job  pfx.."j:"..id
-- KEYS[2] guard pfx.."guard": never written, so no script of a migrating slot runs
-- ARGV[1] pfx
-- ARGV[2] job id
-- Derived keys: pfx.."due", pfx.."status:*".
-- Reply: {'ok', new status}, {'invalid', status} (pending, running, completed, cancelled) or
-- {'missing', ''}
--   or {'corrupt', what} when its keys hold something else (nothing written)
--- @include "now_ms"
--- @include "int"
--- @include "job_problem"
--- @include "job_set_status"

local job = KEYS[1]
local pfx, id = ARGV[1], ARGV[2]
if job_problem(ARGV[1], KEYS[1], ARGV[2]) then
  return {'corrupt', job_problem(ARGV[1], KEYS[1], ARGV[2])}
end
local f = redis.call('HMGET', job, 'status', 'owner', 'lease_until', 'started_at')
local status = f[1]
if not status then
  return {'missing', ''}
end
if status ~= 'paused' and status ~= 'failed' then
  return {'invalid', status}
end
local now = now_ms()
redis.call('HSET', job, 'retries', 0)
redis.call('HDEL', job, 'finished_at', 'paused_from', 'next_run_at')
local lease_until = tonumber(f[3] or '0')
if f[2] and f[2] ~= '' and lease_until > now then
  job_set_status(pfx, id, job, status, 'running', now)
  redis.call('ZADD', pfx .. 'due', int(lease_until), id)
  return {'ok', 'running'}
end
local new = f[4] and 'running' or 'pending'
redis.call('HSET', job, 'owner', '')
redis.call('HDEL', job, 'lease_until')
job_set_status(pfx, id, job, status, new, now)
redis.call('ZADD', pfx .. 'due', int(now), id)
return {'ok', new}
