#!lua flags=allow-oom
-- allow-oom: rewrites a lease field and a due score; no new keys
-- job_extend.lua: heartbeat -- renew the lease of a job whose step is still running.
--
-- KEYS[1] job  pfx.."j:"..id
-- KEYS[2] guard pfx.."guard": never written, so no script of a migrating slot runs
-- ARGV[1] pfx
-- ARGV[2] job id
-- ARGV[3] owner     token from job_claim.lua
-- ARGV[4] lease_ms  new lease length from now
-- Derived keys: pfx.."due".
-- Reply: 1 when renewed, 0 when the lease belongs to someone else (or the job is gone, or its
-- keys hold something else)
--- @include "now_ms"
--- @include "int"
--- @include "job_problem"
--- @include "job_owned"

local job = KEYS[1]
local owner = ARGV[3]
if job_problem(ARGV[1], KEYS[1], ARGV[2]) then
  return 0
end
if not job_owned(job, owner) then
  return 0
end
local until_ms = now_ms() + tonumber(ARGV[4])
redis.call('HSET', job, 'lease_until', int(until_ms))
redis.call('ZADD', ARGV[1] .. 'due', 'XX', int(until_ms), ARGV[2])
return 1
