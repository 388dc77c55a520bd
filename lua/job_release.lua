#!lua flags=allow-oom
-- allow-oom: rewrites a few fixed fields and a due score; frees the lease
-- job_release.lua: give a leased job back at once (worker shutting down between steps); any
-- worker may resume it immediately from its saved cursor.
--
-- KEYS[1] job  pfx.."j:"..id
-- KEYS[2] guard pfx.."guard": never written, so no script of a migrating slot runs
-- ARGV[1] pfx
-- ARGV[2] job id
-- ARGV[3] owner  token from job_claim.lua
-- Derived keys: pfx.."due".
-- Reply: 1 when released, 0 when the lease was no longer ours (or its keys hold something else)
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
local now = now_ms()
redis.call('HSET', job, 'owner', '', 'updated_at', int(now))
redis.call('HDEL', job, 'lease_until')
if redis.call('HGET', job, 'status') == 'running' then
  redis.call('ZADD', ARGV[1] .. 'due', int(now), ARGV[2])
end
return 1
