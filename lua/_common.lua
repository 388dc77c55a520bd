-- _common.lua: helpers prepended by redis_batcher/scripts.py to each script that uses them
-- (each "local function" block up to the next one is included when its name is used).
--
-- Key layout (pfx = "<prefix>:{<processor>:<partition>}:", one hash tag per partition):
--   pfx.."due"            ZSET  member "base::N", score = due time / lease expiry (ms, server clock)
--   pfx.."ids"            SET   base ids with at least one active sequence
--   pfx.."b:"..base       HASH  head: next, acc, active, pending, added_at, a:<N> = status, done_seq, ...
--   pfx.."h:"..base       LIST  flush history, newest first (JSON)
--   pfx.."s:"..base.."::"..N  HASH  sequence state: status, cutoff, window, attempt, deaths, ...
--   pfx.."i:"..base.."::"..N  LIST  encoded items in add order
--   pfx.."dead"           ZSET  dead-letter ids, score = time they died (ms)
--   pfx.."d:"..id         HASH  dead letter: batch_id, sequence, count, error, reason, ...
--   pfx.."di:"..id        LIST  its items
-- Keys derived here from pfx always carry the same hash tag as the declared KEYS.
--
-- A sealed sequence's list holds `cutoff` undelivered items at its head. Each claim delivers the
-- first `window` of them (window <= cutoff, <= max_batch_size). Acks, partial failures and
-- dead-lettering remove items from the head; what is left is delivered next. The first `fid_n`
-- items were delivered under `flush_id`: they keep it on every redelivery (bisected or not).
-- `attempt` counts deliveries of those items (what handlers see); `tries` counts the failed
-- ones that spend the max_attempts budget (bisection steps do not), `deaths` the deliveries
-- whose worker died.

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

local function push_history(hist, entry, cap)
  if redis.call('LPUSH', hist, entry) > cap then
    redis.call('LTRIM', hist, 0, cap - 1)
  end
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

-- Lowest active sequence number of a base id (nil when none); used by ordered processors.
local function lowest_active(head)
  local fields = redis.call('HKEYS', head)
  local low = nil
  for _, f in ipairs(fields) do
    local n = string.match(f, '^a:(%d+)$')
    if n then
      n = tonumber(n)
      if low == nil or n < low then low = n end
    end
  end
  return low
end

-- Ordered processors: a parked sequence becomes due when it is the lowest active one again.
local function unpark(pfx, head, due, base, now)
  local low = lowest_active(head)
  if low then
    local member = member_of(base, low)
    local meta = pfx .. 's:' .. member
    if redis.call('HGET', meta, 'parked') == '1' then
      redis.call('HDEL', meta, 'parked')
      redis.call('ZADD', due, int(now), member)
    end
  end
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

-- `n` items left the head of a sealed sequence (delivered or dead-lettered). Either the
-- sequence is done (completed) or the rest becomes a fresh delivery, due now.
-- cfg: {retention=, ordered=, max=}; known: {cutoff, fid_n} when the caller has read them
local function advance(pfx, base, seq, n, now, cfg, known)
  local member = member_of(base, seq)
  local meta = pfx .. 's:' .. member
  local head = pfx .. 'b:' .. base
  local due = pfx .. 'due'
  local f = known or redis.call('HMGET', meta, 'cutoff', 'fid_n')
  local left = tonumber(f[1] or '0') - n
  local pending = redis.call('HINCRBY', head, 'pending', int(-n))
  if pending < 0 then redis.call('HSET', head, 'pending', 0) end
  if left > 0 then
    redis.call('HSET', meta, 'cutoff', left, 'window', math.min(left, cfg.max), 'owner', '',
      'updated_at', int(now))
    redis.call('HDEL', meta, 'lease_until', 'next_attempt_at')
    -- items already delivered under a flush_id keep it (and their attempt count) until they
    -- leave the sequence, so a handler can always recognise a redelivery
    local fid_n = tonumber(f[2] or '0') - n
    if fid_n > 0 then
      redis.call('HSET', meta, 'fid_n', fid_n)
    else
      redis.call('HSET', meta, 'attempt', 0, 'tries', 0, 'deaths', 0)
      redis.call('HDEL', meta, 'flush_id', 'fid_n', 'last_error')
    end
    redis.call('ZADD', due, int(now), member)
    return left
  end
  redis.call('DEL', meta)
  redis.call('ZREM', due, member)
  retire(pfx, head, pfx .. 'ids', base, seq, cfg.retention)
  if cfg.ordered then unpark(pfx, head, due, base, now) end
  return 0
end

-- Move items into a new dead letter. `items` is a Lua table of raw entries, or nil to move the
-- whole list of the sequence (RENAME, O(1) whatever its length). Ids are "<flush_id>.<cutoff>":
-- the cutoff only decreases within a sequence, so one flush_id never names two dead letters.
local function bury(pfx, id, member, items, count, reason, err, f, now)
  local base, seq = split_member(member)
  local dlist = pfx .. 'di:' .. id
  if items == nil then
    redis.call('RENAME', pfx .. 'i:' .. member, dlist)
  else
    for i = 1, #items, 5000 do
      redis.call('RPUSH', dlist, unpack(items, i, math.min(i + 4999, #items)))
    end
  end
  redis.call('HSET', pfx .. 'd:' .. id, 'batch_id', base, 'sequence', seq, 'count', count,
    'reason', reason, 'error', err or '', 'attempts', f.tries or 0, 'deaths', f.deaths or 0,
    'flush_id', f.flush_id or '', 'created_at', f.created_at or '', 'dead_at', int(now))
  redis.call('ZADD', pfx .. 'dead', int(now), id)
end

-- Pop the first `n` entries of a list (LPOP with a count; Redis >= 6.2).
local function pop_head(key, n)
  if n <= 0 then return {} end
  local got = redis.call('LPOP', key, n)
  if not got then return {} end
  return got
end

-- Put entries back at the head of a list, keeping their order.
local function push_head(key, items)
  for i = #items, 1, -5000 do
    local lo = math.max(1, i - 4999)
    local chunk = {}
    for j = i, lo, -1 do table.insert(chunk, items[j]) end
    redis.call('LPUSH', key, unpack(chunk))
  end
end

local function history_entry(seq, count, started, duration, ok, err, attempt, flush_id, reason)
  return cjson.encode({seq = tonumber(seq), items = count, started_at = started,
    duration_ms = duration, success = ok, error = err, attempt = attempt,
    flush_id = flush_id or '', reason = reason or ''})
end
