-- job_cancel.lua: stop a job for good (status cancelled, which is final). A worker in the middle
-- of a step saves it and then stops (job_commit.lua replies 'cancelled').
--
-- KEYS[1] job  pfx.."j:"..id
-- KEYS[2] guard pfx.."guard": never written, so no script of a migrating slot runs
-- ARGV[1] pfx
-- ARGV[2] job id
-- Derived keys: pfx.."due", pfx.."status:*".
-- Reply: {'ok', previous status}, {'invalid', status} (completed or already cancelled) or
-- {'missing', ''}
--   or {'corrupt', what} when its keys hold something else (nothing written)
--- @include "now_ms"
--- @include "job_problem"
--- @include "job_end"

local job = KEYS[1]
local pfx, id = ARGV[1], ARGV[2]
if job_problem(ARGV[1], KEYS[1], ARGV[2]) then
  return {'corrupt', job_problem(ARGV[1], KEYS[1], ARGV[2])}
end
local status = redis.call('HGET', job, 'status')
if not status then
  return {'missing', ''}
end
if status == 'completed' or status == 'cancelled' then
  return {'invalid', status}
end
local now = now_ms()
job_end(pfx, id, job, status, 'cancelled', now)
redis.call('HDEL', job, 'next_run_at', 'paused_from')
return {'ok', status}
