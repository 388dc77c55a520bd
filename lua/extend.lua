#!lua flags=allow-oom
-- allow-oom: rewrites a lease field and a due score; no new keys
-- extend.lua: heartbeat -- renew the lease of a flush whose handler is still running.
--
-- KEYS[1] due  pfx.."due"
-- KEYS[2] guard pfx.."guard": never written, so no script of a migrating slot runs
-- ARGV[1] pfx
-- ARGV[2] member    "base::N"
-- ARGV[3] owner     token from claim.lua
-- ARGV[4] lease_ms  new lease length from now
-- Derived keys: pfx.."s:"..member.
-- Reply: 1 when renewed, 0 when the lease belongs to someone else (or the flush is gone, or
-- its keys hold something else)
--- @include "now_ms"
--- @include "int"
--- @include "wrong_type"

local due = KEYS[1]
local meta = ARGV[1] .. 's:' .. ARGV[2]
if wrong_type({meta, 'hash', due, 'zset'}) or redis.call('HGET', meta, 'owner') ~= ARGV[3] then
  return 0
end
local until_ms = now_ms() + tonumber(ARGV[4])
redis.call('HSET', meta, 'lease_until', int(until_ms))
redis.call('ZADD', due, 'XX', int(until_ms), ARGV[2])
return 1
