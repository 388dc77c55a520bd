-- replay.lua: put a dead letter's items back into its batch id as a new sealed sequence.
--
-- KEYS[1] head     pfx.."b:"..base
-- KEYS[2] ids      pfx.."ids"
-- KEYS[3] due      pfx.."due"
-- KEYS[4] history  pfx.."h:"..base
-- KEYS[5] guard    pfx.."guard": never written, so no script of a migrating slot runs
-- ARGV[1] pfx
-- ARGV[2] id              dead-letter id
-- ARGV[3] base            the dead letter's batch id (its head is KEYS[1])
-- ARGV[4] max_batch_size  largest delivery window
-- Derived keys: pfx.."d:"..id, pfx.."di:"..id, the new sequence's state and items; wakes a
-- worker: sets the wake-up token pfx.."woke", publishes on the channel pfx.."wake".
-- Reply: {code, seq, count}; code 'ok' | 'not_found' | 'corrupt' (seq: what is wrong; nothing
-- written)
--- @include "now_ms"
--- @include "int"
--- @include "member_of"
--- @include "wrong_type"
--- @include "head_problem"
--- @include "partition_problem"
--- @include "next_free_seq"
--- @include "flush_id_of"
--- @include "wake_always"
--- @include "pending_delta"

local head, ids, due, hist = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local pfx, id, base = ARGV[1], ARGV[2], ARGV[3]
local dmeta, dlist = pfx .. 'd:' .. id, pfx .. 'di:' .. id
local why = head_problem(head) or partition_problem(pfx) or wrong_type({dmeta, 'hash', dlist, 'list'})
if why then
  return {'corrupt', why, 0}
end
if redis.call('EXISTS', dmeta) == 0 then
  return {'not_found', -1, 0}
end
local now, sub = now_ms()
local count = redis.call('LLEN', dlist)
if count == 0 then
  redis.call('DEL', dmeta)
  redis.call('ZREM', pfx .. 'dead', id)
  return {'ok', -1, 0}
end
local seq = next_free_seq(pfx, head, base)
local member = member_of(base, seq)
redis.call('RENAME', dlist, pfx .. 'i:' .. member)
redis.call('PERSIST', pfx .. 'i:' .. member)  -- live items never expire (dead letters may)
redis.call('HSET', pfx .. 's:' .. member, 'status', 'flushing', 'cutoff', count,
  'window', math.min(count, tonumber(ARGV[4])), 'created_at', int(now), 'updated_at', int(now),
  'sealed_at', int(now), 'reason', 'replay', 'attempt', 0, 'max', ARGV[4],
  'flush_id', flush_id_of(pfx, base, seq, now * 1000 + sub))  -- a new flush: a new id
redis.call('HSET', head, 'a:' .. seq, 'flushing')
pending_delta(pfx, head, count)
if redis.call('HINCRBY', head, 'active', 1) == 1 then
  redis.call('SADD', ids, base)
  redis.call('PERSIST', head)
  redis.call('PERSIST', hist)
end
redis.call('ZADD', due, int(now), member)
redis.call('DEL', dmeta)
redis.call('ZREM', pfx .. 'dead', id)
wake_always(pfx)
return {'ok', seq, count}
