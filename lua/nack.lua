-- nack.lua: a handler failed -- keep the items, record the error, retry after a backoff.
--
-- KEYS[1] due      pfx.."due"
-- KEYS[2] history  pfx.."h:"..base
-- ARGV[1] pfx
-- ARGV[2] member    "base::N"
-- ARGV[3] owner     token from claim.lua; a worker that lost its lease is refused
-- ARGV[4] entry     history record (JSON)
-- ARGV[5] cap       history length limit
-- ARGV[6] delay_ms  backoff before the next attempt
-- ARGV[7] error     error text kept on the sequence
-- Derived keys: pfx.."s:"..member.
-- Reply: {code, next_attempt_at_ms}; code 'ok' | 'lease_lost' (nothing changed)
local due, hist = KEYS[1], KEYS[2]
local pfx, member, owner = ARGV[1], ARGV[2], ARGV[3]
local meta = pfx .. 's:' .. member
local f = redis.call('HMGET', meta, 'owner', 'status')
if f[1] ~= owner or f[2] ~= 'flushing' then
  return {'lease_lost', 0}
end
local now = now_ms()
local at = now + tonumber(ARGV[6])
redis.call('HSET', meta, 'owner', '', 'last_error', ARGV[7], 'next_attempt_at', int(at),
  'updated_at', int(now))
redis.call('HDEL', meta, 'lease_until')
redis.call('ZADD', due, int(at), member)
push_history(hist, ARGV[4], tonumber(ARGV[5]))
return {'ok', at}
