-- job_pause.lua: pause a pending or running job. It leaves the runnable set at once; a worker in
-- the middle of a step still saves that step and then stops (job_commit.lua replies 'paused').
--
-- KEYS[1] job  pfx.."j:"..id
-- KEYS[2] guard pfx.."guard": never written, so no script of a migrating slot runs
-- ARGV[1] pfx
-- ARGV[2] job id
-- Derived keys: pfx.."due", pfx.."status:*".
-- Reply: {'ok', previous status} ('paused' again is a no-op), {'invalid', status} for a finished
-- job, {'missing', ''} when there is no such job
--   or {'corrupt', what} when its keys hold something else (nothing written)
--- @include "now_ms"
--- @include "job_problem"
--- @include "job_set_status"

local job = KEYS[1]
local pfx, id = ARGV[1], ARGV[2]
if job_problem(ARGV[1], KEYS[1], ARGV[2]) then
  return {'corrupt', job_problem(ARGV[1], KEYS[1], ARGV[2])}
end
local status = redis.call('HGET', job, 'status')
if not status then
  return {'missing', ''}
end
if status == 'paused' then
  return {'ok', status}
end
if status ~= 'pending' and status ~= 'running' then
  return {'invalid', status}
end
local now = now_ms()
job_set_status(pfx, id, job, status, 'paused', now)
redis.call('HSET', job, 'paused_from', status)
redis.call('HDEL', job, 'next_run_at')
redis.call('ZREM', pfx .. 'due', id)
return {'ok', status}
