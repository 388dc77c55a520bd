-- job_start.lua: create an iterator job; it is runnable at once (status pending).
--
-- KEYS[1] job  pfx.."j:"..id
-- KEYS[2] guard pfx.."guard": never written, so no script of a migrating slot runs
-- ARGV[1] pfx
-- ARGV[2] job id
-- ARGV[3] iterator name
-- ARGV[4] params (JSON)
-- ARGV[5] config (JSON snapshot of the settings the job runs with)
-- ARGV[6] overrides (JSON of the settings given to this job's start, which every worker that
--         claims it applies over its iterator's; '' for none: no field written)
-- Derived keys: pfx.."due", pfx.."status:pending".
-- Reply: {'ok', created_at_ms} or {'exists', current status}; an existing job is left untouched;
-- {'corrupt', what} when its keys hold something else (nothing written)
--- @include "now_ms"
--- @include "int"
--- @include "job_problem"
--- @include "job_set_status"

local job = KEYS[1]
local pfx, id = ARGV[1], ARGV[2]
if job_problem(ARGV[1], KEYS[1], ARGV[2]) then
  return {'corrupt', job_problem(ARGV[1], KEYS[1], ARGV[2])}
end
local status = redis.call('HGET', job, 'status')
if status then
  return {'exists', status}
end
local now = now_ms()
redis.call('HSET', job, 'job_id', id, 'iterator', ARGV[3], 'params', ARGV[4], 'config', ARGV[5],
  'processed', 0, 'retries', 0, 'created_at', int(now), 'owner', '')
if ARGV[6] ~= '' then
  redis.call('HSET', job, 'overrides', ARGV[6])
end
job_set_status(pfx, id, job, nil, 'pending', now)
redis.call('ZADD', pfx .. 'due', int(now), id)
return {'ok', int(now)}
