#!lua flags=allow-oom
-- allow-oom: rewrites a few fixed fields and a due score; frees the lease for another worker
-- release.lua: give a leased flush back at once (worker shutting down before its handler ran
-- or finished); the attempt is not counted and any worker may take it immediately.
--
-- KEYS[1] due  pfx.."due"
-- KEYS[2] guard pfx.."guard": never written, so no script of a migrating slot runs
-- ARGV[1] pfx
-- ARGV[2] member   "base::N"
-- ARGV[3] owner    token from claim.lua
-- Derived keys: pfx.."s:"..member; wakes another worker: sets the wake-up
-- token pfx.."woke", publishes on the channel pfx.."wake".
-- Reply: 1 when released, 0 when the lease was no longer ours (or its keys hold something else)
--- @include "now_ms"
--- @include "int"
--- @include "wrong_type"
--- @include "bad_ints"
--- @include "wake_always"

local due = KEYS[1]
local meta = ARGV[1] .. 's:' .. ARGV[2]
if wrong_type({meta, 'hash', due, 'zset'}) or bad_ints(meta, {'attempt'})
    or redis.call('HGET', meta, 'owner') ~= ARGV[3] then
  return 0
end
local now = now_ms()
local attempt = tonumber(redis.call('HGET', meta, 'attempt') or '1')
redis.call('HSET', meta, 'owner', '', 'attempt', math.max(attempt - 1, 0), 'updated_at', int(now))
redis.call('HDEL', meta, 'lease_until')
redis.call('ZADD', due, int(now), ARGV[2])
wake_always(ARGV[1])
return 1
