-- _common.lua: helpers prepended by redis_batcher/scripts.py to each script that uses them
-- (each "local function" block up to the next one is included when its name is used).
--
-- Key layout (pfx = "<prefix>:{<processor>:<partition>}:", one hash tag per partition):
--   pfx.."due"            ZSET  member "base::N", score = due time / lease expiry (ms, server clock)
--   pfx.."ids"            SET   base ids with at least one active sequence
--   pfx.."b:"..base       HASH  head: next, acc, active, pending, a:<N> = status, done_seq, ...
--                               (pending: the undelivered items of its sealed sequences)
--   pfx.."h:"..base       LIST  flush history, newest first (JSON)
--   pfx.."s:"..base.."::"..N  HASH  sequence state: status, cutoff, window, attempt, deaths, ...
--   pfx.."o:"..base       LIST  the accumulating sequence's list: a header "<N>:<last add ms>",
--                               then its encoded items in add order (exists iff head has acc)
--   pfx.."i:"..base.."::"..N  LIST  a sealed sequence's encoded items in add order (the o: list
--                               renamed at sealing, its header dropped)
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

-- The head's side of sealing: the sequence no longer takes adds and is indexed as flushing.
local function seal_head(head, seq)
  if redis.call('HGET', head, 'acc') == tostring(seq) then
    redis.call('HDEL', head, 'acc')
  end
  redis.call('HSET', head, 'a:' .. seq, 'flushing')
end

-- The sequence-hash fields of a sealed sequence (field, value, ...), ready for HSET.
local function sealed_fields(count, reason, now)
  return {'status', 'flushing', 'cutoff', count, 'sealed_at', int(now), 'reason', reason,
    'updated_at', int(now)}
end

-- The header entry of a base id's open list (index 0): the accumulating sequence's number and
-- the time of its last add (ms, 13 digits: the entry keeps its size when LSET rewrites it).
local function open_header(seq, now)
  return seq .. ':' .. int(now)
end

-- How many items the base id's open list holds for its accumulating sequence `seq` (the list
-- minus its header): 0 when there is no open list, or when its header names another sequence
-- (that list is then never touched on seq's behalf). Also returns the list's key and whether
-- it is seq's.
local function open_count_of(pfx, base, seq)
  local okey = pfx .. 'o:' .. base
  local header = redis.call('LINDEX', okey, 0)
  if not header or string.match(header, '^(%d+):') ~= tostring(seq) then
    return 0, okey, false
  end
  return redis.call('LLEN', okey) - 1, okey, true
end

-- The items of a base id's accumulating sequence become the sealed sequence's list: the open
-- list is renamed (O(1), whatever its length) and its header dropped; they now count as the
-- head's pending. count: the open list's items for seq (open_count_of). Should the sequence's
-- own list hold items already -- added by a version of this library from before the open
-- list, straight to that list and counted as pending -- the open list's items are moved after
-- them one by one instead, never renamed over them. Returns the sealed list's length.
local function seal_items(pfx, head, base, seq, count)
  local ikey = pfx .. 'i:' .. member_of(base, seq)
  if count > 0 then
    local okey = pfx .. 'o:' .. base
    if redis.call('EXISTS', ikey) == 0 then
      redis.call('RENAME', okey, ikey)
      redis.call('LPOP', ikey)
      redis.call('HINCRBY', head, 'pending', count)
      return count
    end
    redis.call('LPOP', okey)
    for _ = 1, count do
      redis.call('LMOVE', okey, ikey, 'LEFT', 'RIGHT')
    end
    redis.call('HINCRBY', head, 'pending', count)
  end
  return redis.call('LLEN', ikey)
end

-- Seal an accumulating sequence: it becomes 'flushing' with its cutoff recorded and is due now.
-- count: its open list's items (see seal_items). Returns the sealed sequence's item count.
local function seal(pfx, head, due, base, seq, count, reason, now)
  local member = member_of(base, seq)
  local total = seal_items(pfx, head, base, seq, count)
  redis.call('HSET', pfx .. 's:' .. member, unpack(sealed_fields(total, reason, now)))
  seal_head(head, seq)
  redis.call('ZADD', due, int(now), member)
  return total
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
-- the ids set and its head and history start their retention countdown. h: the head's
-- {acc, active} when the caller has read them; set: more head fields (field, value, ...) to
-- write with the new active count (one HDEL and one HSET on the head).
local function retire(pfx, head, ids, base, seq, retention, h, set)
  h = h or redis.call('HMGET', head, 'acc', 'active')
  if h[1] == tostring(seq) then
    redis.call('HDEL', head, 'a:' .. seq, 'acc')
  else
    redis.call('HDEL', head, 'a:' .. seq)
  end
  local active = tonumber(h[2] or '0') - 1
  set = set or {}
  table.insert(set, 'active')
  table.insert(set, math.max(active, 0))
  redis.call('HSET', head, unpack(set))
  if active <= 0 then
    redis.call('SREM', ids, base)
    if retention > 0 then
      redis.call('EXPIRE', head, retention)
      redis.call('EXPIRE', pfx .. 'h:' .. base, retention)
    end
  end
end

-- `n` items left the head of a sealed sequence (delivered or dead-lettered). Either the
-- sequence is done (completed) or the rest becomes a fresh delivery, due now.
-- cfg: {retention=, ordered=, max=}; known: {cutoff, fid_n} when the caller has read them;
-- done: the sequence's delivered item count when an ack completes it (the head then records
-- the highest completed sequence: done_seq, done_items, done_at)
local function advance(pfx, base, seq, n, now, cfg, known, done)
  local member = member_of(base, seq)
  local meta = pfx .. 's:' .. member
  local head = pfx .. 'b:' .. base
  local due = pfx .. 'due'
  local f = known or redis.call('HMGET', meta, 'cutoff', 'fid_n')
  local left = tonumber(f[1] or '0') - n
  if left > 0 then
    local pending = redis.call('HINCRBY', head, 'pending', int(-n))
    if pending < 0 then redis.call('HSET', head, 'pending', 0) end
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
  -- the head's counters, index and completion record: one read, one HDEL, one HSET
  local h = redis.call('HMGET', head, 'pending', 'acc', 'active', 'done_seq')
  local set = {'pending', int(math.max(tonumber(h[1] or '0') - n, 0))}
  if done and tonumber(seq) >= tonumber(h[4] or '-1') then
    -- concurrent flushes finish in any order: keep the highest completed sequence
    for _, v in ipairs({'done_seq', seq, 'done_items', done, 'done_at', int(now)}) do
      table.insert(set, v)
    end
  end
  retire(pfx, head, pfx .. 'ids', base, seq, cfg.retention, {h[2], h[3]}, set)
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

-- ms until the earliest entry of a delay queue is due (0 = due now); -1 when it is empty.
local function next_due_ms(due, now)
  local first = redis.call('ZRANGE', due, 0, 0, 'WITHSCORES')
  if #first == 0 then
    return -1
  end
  return math.max(0, tonumber(first[2]) - now)
end

-- Claim options from ARGV[i..i+11] (claim.lua's ARGV[2..13]; ack.lua's optional ARGV[9..20]).
local function claim_opts(i)
  return {limit = tonumber(ARGV[i]), lease = tonumber(ARGV[i + 1]), owner = ARGV[i + 2],
    seed = ARGV[i + 3], max_deaths = tonumber(ARGV[i + 7]), bisect = ARGV[i + 8] == '1',
    cap = tonumber(ARGV[i + 10]), inline_max = tonumber(ARGV[i + 11] or '0'),
    cfg = {retention = tonumber(ARGV[i + 4]), max = tonumber(ARGV[i + 5]), ordered = ARGV[i + 9] == '1'}}
end

-- Take up to o.limit due sequences from a partition's delay queue and lease them to o.owner
-- (claim.lua; ack.lua when the worker asks for its next flush with the ack). Returns claim.lua's
-- reply: {next_due_ms, then six fields per claimed sequence}; next_due_ms is BACKLOG_DUE
-- when at least BACKLOG more sequences were due than it took (a backlog: the worker then
-- spreads them over its threads). Looking BACKLOG entries further with the same ZRANGEBYSCORE
-- also spares the ZRANGE of next_due_ms whenever more is due.
local BACKLOG, BACKLOG_DUE = 8, -2
local function claim_due(due, pfx, o, now)
  local limit, lease, owner, seed = o.limit, o.lease, o.owner, o.seed
  local cfg, max_deaths, bisect, cap, inline_max = o.cfg, o.max_deaths, o.bisect, o.cap, o.inline_max
  local out = {0}
  local members = redis.call('ZRANGEBYSCORE', due, '-inf', int(now), 'LIMIT', 0, limit + BACKLOG)
  local found = #members
  for n = 1, math.min(found, limit) do
    local member = members[n]
    local meta = pfx .. 's:' .. member
    local base, seq = split_member(member)
    local f = redis.call('HMGET', meta, 'status', 'cutoff', 'attempt', 'flush_id', 'reason', 'owner',
      'deaths', 'window', 'last_error', 'created_at', 'claimed_at', 'fid_n', 'tries')
    if (not base) or (not f[1]) then
      -- an entry whose sequence no longer exists: nothing to deliver
      redis.call('ZREM', due, member)
    else
      local head = pfx .. 'b:' .. base
      local ikey = pfx .. 'i:' .. member
      local cutoff = tonumber(f[2])
      local reason = f[5]
      local deliver = true
      local sealing = false
      if f[1] == 'accumulating' then
        -- interval timer fired: seal with the current length as the cutoff (the sequence's
        -- own fields and its due entry are written once, with the delivery below); the open
        -- list becomes the sequence's list, so later adds open the next sequence
        local open, okey, own = open_count_of(pfx, base, seq)
        if open == 0 and own then
          redis.call('DEL', okey)  -- its header alone
        end
        cutoff = seal_items(pfx, head, base, seq, open)
        if cutoff > 0 then
          seal_head(head, seq)
          sealing = true
          reason = 'interval'
        end
      elseif not cutoff then
        cutoff = redis.call('LLEN', ikey)
        redis.call('HSET', meta, 'cutoff', cutoff)
      end
      if cutoff == 0 then
        -- nothing to deliver: drop the sequence instead of leaving a due entry that never clears
        redis.call('DEL', meta, ikey)
        redis.call('ZREM', due, member)
        retire(pfx, head, pfx .. 'ids', base, seq, cfg.retention)
        deliver = false
      end
      if deliver and cfg.ordered then
        local low = lowest_active(head)
        if low and low < tonumber(seq) then
          -- an earlier sequence is still in flight or retrying: wait until it is done
          redis.call('ZREM', due, member)
          redis.call('HSET', meta, 'parked', 1)
          if sealing then
            redis.call('HSET', meta, unpack(sealed_fields(cutoff, reason, now)))
          end
          deliver = false
        end
      end
      local attempt = tonumber(f[3] or '0')
      local flush_id = f[4]
      local window = math.min(tonumber(f[8] or cutoff), cutoff, cfg.max)
      local fid_n = tonumber(f[12] or '0')
      if flush_id and fid_n > 0 then
        window = math.min(window, fid_n)  -- never mix items of an earlier delivery with new ones
      end
      if deliver and f[6] and f[6] ~= '' then
        -- the previous delivery was never settled: its worker died or lost its lease
        local deaths = tonumber(f[7] or '0') + 1
        local err = 'worker died or lost its lease during the handler'
        push_history(pfx .. 'h:' .. base, history_entry(seq, window, tonumber(f[11] or now), 0,
          false, err, attempt, flush_id, reason), cap)
        if bisect and window > 1 then
          -- the crash may be caused by one item: deliver the first half on its own (same
          -- flush_id: the dead worker's handler may have processed these items)
          window = math.ceil(window / 2)
          redis.call('HSET', meta, 'deaths', 0, 'last_error', err)
        elseif deaths >= max_deaths then
          local why = 'max_deaths'
          local whole = window == redis.call('LLEN', ikey)
          local items = nil
          if not whole then items = pop_head(ikey, window) end
          bury(pfx, (flush_id or (seed .. '-' .. n)) .. '.' .. cutoff, member, items, window, why, f[9] or err,
            {tries = tonumber(f[13] or '0'), deaths = deaths, flush_id = flush_id, created_at = f[10]}, now)
          advance(pfx, base, seq, window, now, cfg)
          deliver = false
        else
          redis.call('HSET', meta, 'deaths', deaths, 'last_error', err)
        end
      end
      if deliver then
        attempt = attempt + 1
        if not flush_id then
          flush_id = seed .. '-' .. n
          fid_n = window
        end
        -- the lease, and (after an interval seal) the sealed state, in one write
        local fields = sealing and sealed_fields(cutoff, reason, now) or {'updated_at', int(now)}
        redis.call('HSET', meta, 'attempt', attempt, 'owner', owner, 'flush_id', flush_id, 'fid_n', fid_n,
          'window', window, 'claimed_at', int(now), 'lease_until', int(now + lease), unpack(fields))
        redis.call('ZADD', due, int(now + lease), member)
        table.insert(out, member)
        table.insert(out, window)
        table.insert(out, attempt)
        table.insert(out, flush_id)
        table.insert(out, reason or '')
        if window <= inline_max then
          local items = redis.call('LRANGE', ikey, 0, window - 1)
          if cmsgpack then items = cmsgpack.pack(items) end
          table.insert(out, items)
        else
          table.insert(out, 0)
        end
      end
    end
  end
  if found >= limit + BACKLOG then
    out[1] = BACKLOG_DUE
  elseif found > limit then
    out[1] = 0  -- more is due now
  else
    out[1] = next_due_ms(due, now)
  end
  return out
end
