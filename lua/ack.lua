-- ack.lua: a handler succeeded -- remove exactly the flushed prefix and complete the sequence.
--
-- KEYS[1] due      pfx.."due"
-- KEYS[2] head     pfx.."b:"..base
-- KEYS[3] history  pfx.."h:"..base
-- KEYS[4] ids      pfx.."ids"
-- ARGV[1] pfx
-- ARGV[2] member     "base::N"
-- ARGV[3] owner      token from claim.lua; a worker that lost its lease is refused
-- ARGV[4] entry      history record (JSON)
-- ARGV[5] cap        history length limit
-- ARGV[6] retention  seconds to keep head/history once the base id has no active sequence
-- Derived keys: pfx.."s:"..member, pfx.."i:"..member.
-- Reply: {code, remaining}
--   code 'ok' | 'lease_lost' (nothing changed); remaining = items left after the cutoff
local due, head, hist, ids = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local pfx, member, owner = ARGV[1], ARGV[2], ARGV[3]
local cap, retention = tonumber(ARGV[5]), tonumber(ARGV[6])
local meta = pfx .. 's:' .. member
local ikey = pfx .. 'i:' .. member
local f = redis.call('HMGET', meta, 'owner', 'cutoff', 'status')
if f[1] ~= owner or f[3] ~= 'flushing' then
  return {'lease_lost', 0}
end
local cutoff = tonumber(f[2])
local now = now_ms()
local len = redis.call('LLEN', ikey)
local remaining = 0
if len <= cutoff then
  redis.call('UNLINK', ikey)
else
  redis.call('LTRIM', ikey, cutoff, -1)
  remaining = len - cutoff
end
push_history(hist, ARGV[4], cap)
local base, seq = split_member(member)
if remaining > 0 then
  -- items beyond the cutoff are never dropped: they become a fresh delivery of this sequence
  redis.call('HSET', meta, 'cutoff', remaining, 'owner', '', 'attempt', 0, 'updated_at', int(now))
  redis.call('HDEL', meta, 'flush_id', 'lease_until', 'last_error', 'next_attempt_at')
  redis.call('ZADD', due, int(now), member)
else
  redis.call('DEL', meta)
  redis.call('ZREM', due, member)
  redis.call('HSET', head, 'done_seq', seq, 'done_items', cutoff, 'done_at', int(now))
  retire(pfx, head, ids, base, seq, retention)
end
return {'ok', remaining}
