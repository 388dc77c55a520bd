-- job_finish.lua: the data source is exhausted and on_complete (if any) returned: complete the job.
--
-- KEYS[1] job  pfx.."j:"..id
-- KEYS[2] guard pfx.."guard": never written, so no script of a migrating slot runs
-- ARGV[1] pfx
-- ARGV[2] job id
-- ARGV[3] owner  token from job_claim.lua
-- Derived keys: pfx.."due", pfx.."status:*".
-- Reply: 'completed', 'lease_lost', 'corrupt' (its keys hold something else: nothing written),
-- or the status when it was paused or cancelled meanwhile
--- @include "now_ms"
--- @include "job_problem"
--- @include "job_owned"
--- @include "job_end"

local job = KEYS[1]
local pfx, id, owner = ARGV[1], ARGV[2], ARGV[3]
if job_problem(ARGV[1], KEYS[1], ARGV[2]) then
  return 'corrupt'
end
if not job_owned(job, owner) then
  return 'lease_lost'
end
local now = now_ms()
local status = redis.call('HGET', job, 'status')
redis.call('HSET', job, 'owner', '')
redis.call('HDEL', job, 'lease_until')
if status ~= 'running' then
  return status
end
job_end(pfx, id, job, 'running', 'completed', now)
return 'completed'
