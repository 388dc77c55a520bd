-- _common.lua: helpers prepended to every script by redis_batcher/scripts.py.
--
-- Key layout (pfx = "<prefix>:{<processor>:<partition>}:", one hash tag per partition):
--   pfx.."due"            ZSET  member "base::N", score = due time / lease expiry (ms, server clock)
--   pfx.."ids"            SET   base ids with at least one active sequence
--   pfx.."b:"..base       HASH  head: next, acc, active, a:<N> = status, done_seq, done_items, done_at
--   pfx.."h:"..base       LIST  flush history, newest first (JSON written by the worker)
--   pfx.."s:"..base.."::"..N  HASH  sequence state: status, created_at, updated_at, cutoff, ...
--   pfx.."i:"..base.."::"..N  LIST  encoded items in add order
-- Keys derived here from pfx always carry the same hash tag as the declared KEYS.

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function int(n)
  return string.format('%d', n)
end

local function member_of(base, seq)
  return base .. '::' .. seq
end

local function split_member(member)
  local base, seq = string.match(member, '^(.*)::(%d+)$')
  return base, seq
end

-- Seal an accumulating sequence: it becomes 'flushing' with its cutoff recorded and is due now.
local function seal(pfx, head, due, base, seq, count, reason, now)
  local member = member_of(base, seq)
  redis.call('HSET', pfx .. 's:' .. member, 'status', 'flushing', 'cutoff', count,
    'sealed_at', int(now), 'reason', reason, 'updated_at', int(now))
  if redis.call('HGET', head, 'acc') == tostring(seq) then
    redis.call('HDEL', head, 'acc')
  end
  redis.call('HSET', head, 'a:' .. seq, 'flushing')
  redis.call('ZADD', due, int(now), member)
end

-- Drop a sequence from its head's index; when no active sequence is left the base id leaves
-- the ids set and its head and history start their retention countdown.
local function retire(pfx, head, ids, base, seq, retention)
  redis.call('HDEL', head, 'a:' .. seq)
  if redis.call('HGET', head, 'acc') == tostring(seq) then
    redis.call('HDEL', head, 'acc')
  end
  local active = redis.call('HINCRBY', head, 'active', -1)
  if active <= 0 then
    redis.call('HSET', head, 'active', 0)
    redis.call('SREM', ids, base)
    if retention > 0 then
      redis.call('EXPIRE', head, retention)
      redis.call('EXPIRE', pfx .. 'h:' .. base, retention)
    end
  end
end

local function push_history(hist, entry, cap)
  redis.call('LPUSH', hist, entry)
  redis.call('LTRIM', hist, 0, cap - 1)
end
