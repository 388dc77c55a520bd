-- job_delete.lua: remove a job and its progress samples. Refused while it is running or paused.
--
-- KEYS[1] job  pfx.."j:"..id
-- KEYS[2] guard pfx.."guard": never written, so no script of a migrating slot runs
-- ARGV[1] pfx
-- ARGV[2] job id
-- Derived keys: pfx.."due", pfx.."r:"..id, pfx.."status:*".
-- Reply: {'ok', status}, {'refused', status} or {'missing', ''}
--   or {'corrupt', what} when its keys hold something else (nothing written)
--- @include "job_problem"

local job = KEYS[1]
local pfx, id = ARGV[1], ARGV[2]
if job_problem(ARGV[1], KEYS[1], ARGV[2]) then
  return {'corrupt', job_problem(ARGV[1], KEYS[1], ARGV[2])}
end
local status = redis.call('HGET', job, 'status')
if not status then
  return {'missing', ''}
end
if status == 'running' or status == 'paused' then
  return {'refused', status}
end
redis.call('DEL', job, pfx .. 'r:' .. id)
redis.call('ZREM', pfx .. 'due', id)
redis.call('ZREM', pfx .. 'status:' .. status, id)
return {'ok', status}
