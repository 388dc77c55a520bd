-- add.lua: append items to a base id's accumulating sequence, sealing full sequences.
--
-- KEYS[1] head      pfx.."b:"..base; pfx (the partition's key prefix) is read from it
-- KEYS[2] guard     pfx.."guard": never written, so no script of a migrating slot runs
-- ARGV[1] base      base batch id
-- ARGV[2] config    "<max_batch_size> <interval_ms> <max_pending> <segments>": a sequence is
--                   sealed at max_batch_size items; interval_ms is the delay before an interval
--                   flush (-1 = no timer); max_pending refuses an add that would leave the base
--                   id with more undelivered items (-1 = no limit); segments is '-' (all items
--                   are one add) or "n1,n2,..": several adds coalesced into one call (group
--                   commit), each answered on its own. A processor with flush_idle sends
--                   "<max_batch_size> <interval_ms> <max_pending> <idle_ms> <segments>"
-- ARGV[3..] items   encoded items, in add order
-- Few arguments and a one-string reply keep the client's cost down on the hot path. The
-- accumulating sequence's items live in the base id's open list, pfx.."o:"..base, behind a
-- header entry "<seq>:<last add ms>/<max_batch_size>"; sealing renames it to the sequence's own
-- list. A sequence is sealed at the max_batch_size it was opened with (its header's), whatever
-- the caller's. So an add into an open sequence without max_pending touches that one key only
-- -- TIME, LINDEX (the header), RPUSH, LSET (its time) -- and never the head: with many batch ids each key an add
-- touches is cold in the CPU's caches, and a second one cost as much again (benchmarks.scale).
-- With max_pending the head's pending count (sealed sequences' undelivered items) is read too.
-- A sequence that an add opens and fills at once (add_many of max_batch_size items or more)
-- is written sealed from the start, straight into its own list: HINCRBY next, HSET state,
-- HINCRBY active, RPUSH, ZADD due, 5 commands instead of 10. Sealing writes the sequence's
-- flush_id with its sealed state (see includes/flush_id_of.lua): the id its deliveries carry.
-- flush_idle (debounce): a sequence opened with it is due idle_ms after its last add, but never
-- later than interval_ms after its first. Its header carries that deadline, "/<cap ms>" (0: no
-- flush_interval), so each add moves its due entry (one ZADD XX) without another read; a
-- sequence opened without it has no cap in its header and is not moved, whoever adds to it.
-- Without flush_idle an add does nothing of this.
-- Derived keys (same hash tag): pfx.."o:"..base, pfx.."ids", pfx.."due", pfx.."h:"..base,
-- pfx.."woke", and the state and items of the sequences touched. Wakes the workers serving the
-- partition (a message on its channel pfx.."wake": SPUBLISH on Redis 7+, else PUBLISH) when a
-- sequence is sealed or a new timer became the earliest entry of the delay queue -- unless
-- the previous wake-up of this partition is still unanswered:
-- pfx.."woke", the wake-up's token, is set with each wake-up (for at most WAKE_HOLD_MS); the
-- one woken worker that takes it (DEL) claims, and its claim ends the hold (claim.lua). That
-- worker has not claimed yet, so it will find this sequence too (it claims up to its free
-- slots, and a claim that leaves more due sends the token out again);
-- under load this saves a message to every worker per sealed batch.
-- Keys found holding something else (data this library did not write) make the add refused,
-- before anything is written; an open list whose header is damaged keeps its items for the
-- accumulating sequence, under a new header; a sequence number whose keys are taken already
-- is skipped.
-- Reply: one string, a ';'-separated entry per add (segment), in order:
--   "seq,pending,A|F,sealed,added"  -- the sequence that got the add's last item, its length,
--                                      A(ccumulating) or F(lushing: that item sealed it), how
--                                      many sequences the add sealed, how many items it added
--   "full,undelivered"              -- refused by max_pending, nothing of that add written
-- or "corrupt,<what is wrong>" for the whole call, nothing written.
--- @include "now_ms"
--- @include "int"
--- @include "member_of"
--- @include "wrong_type"
--- @include "head_problem"
--- @include "seq_problem"
--- @include "next_free_seq"
--- @include "flush_id_of"
--- @include "sealed_fields"
--- @include "open_header"
--- @include "parse_header"
--- @include "open_items_of"
--- @include "seal"
--- @include "wake_workers"
--- @include "pending_delta"
--- @include "idle_due"

local head = KEYS[1]
local base = ARGV[1]
local pfx = string.sub(head, 1, #head - #base - 2)
local max, interval, max_pending, segments, idle = string.match(ARGV[2], '^(%-?%d+) (%-?%d+) (%-?%d+) (%S+)$')
if not max then
  -- flush_idle's fifth field: only a processor that sets it pays for parsing it
  max, interval, max_pending, idle, segments = string.match(ARGV[2], '^(%-?%d+) (%-?%d+) (%-?%d+) (%d+) (%S+)$')
  idle = tonumber(idle)
end
max, interval, max_pending = tonumber(max), tonumber(interval), tonumber(max_pending)
local first, last = 3, #ARGV
local now, sub = now_ms()  -- sub: the microseconds past `now` (a seal's flush_id)
local okey = pfx .. 'o:' .. base

-- The hot paths' seal of the open sequence their item filled: its reply, or nil when the head
-- or the sequence's keys hold something else -- the item is then taken back and the general
-- path below refuses the add.
local function seal_full(seq, count)
  if seq_problem(pfx, member_of(base, seq)) or head_problem(head)
      or wrong_type({pfx .. 'due', 'zset'}) then
    redis.call('RPOP', okey)
    return nil
  end
  count = seal(pfx, head, pfx .. 'due', base, seq, count, 'size', now, sub)
  wake_workers(pfx)
  return seq .. ',' .. count .. ',F,1,1'
end

-- The hot path with flush_idle, into a sequence opened with it (its header names a cap): the
-- same as the one below, and the due entry moved to idle_ms from now (never past the cap). Any
-- other header goes on below.
if idle and last == first and segments == '-' and max_pending < 0 then
  local header = redis.pcall('LINDEX', okey, 0)
  local seq, smax, cap = nil, nil, nil
  if type(header) == 'string' then
    seq, smax, cap = string.match(header, '^(%d+):%d+/(%d+)/(%d+)$')
  end
  if seq and #seq <= 15 and #smax <= 15 and #cap <= 15 then
    local count = redis.call('RPUSH', okey, ARGV[first]) - 1
    if count < tonumber(smax) then
      redis.call('LSET', okey, 0, open_header(seq, now, smax) .. '/' .. cap)
      redis.call('ZADD', pfx .. 'due', 'XX', idle_due(now, idle, tonumber(cap)), member_of(base, seq))
      return seq .. ',' .. count .. ',A,0,1'
    end
    local sealed = seal_full(seq, count)
    if sealed then return sealed end
  end
end

-- The hot path, kept short (every Lua operation costs here): one item from one caller into
-- the open sequence, no max_pending. The header is read first, so that nothing is written
-- unless it is sound (a missing open list: no sequence accumulates; a damaged one, or a key of
-- another type: the general path below sorts it out). Same effects and reply as the general
-- path.
if last == first and segments == '-' and max_pending < 0 then
  local header = redis.pcall('LINDEX', okey, 0)
  local seq, smax = nil, nil
  if type(header) == 'string' then
    seq, smax = string.match(header, '^(%d+):%d+/?(%d*)$')
  end
  if seq and #seq <= 15 and #smax <= 15 then
    smax = tonumber(smax) or max
    local count = redis.call('RPUSH', okey, ARGV[first]) - 1
    if count < smax then
      redis.call('LSET', okey, 0, open_header(seq, now, smax))
      return seq .. ',' .. count .. ',A,0,1'
    end
    local sealed = seal_full(seq, count)
    if sealed then return sealed end
  end
end

local ids, due, hist = pfx .. 'ids', pfx .. 'due', pfx .. 'h:' .. base
local why = head_problem(head) or wrong_type({okey, 'list', due, 'zset', ids, 'set'})
local state = {}
if not why then
  state = redis.call('HMGET', head, 'acc', 'pending')
  why = state[1] and seq_problem(pfx, member_of(base, state[1]))
end
if why then
  return 'corrupt,' .. why
end
local wake = false
local scap = nil        -- the open sequence's flush_idle cap (its header's), nil: none
local opened = false    -- this call opened it (and set its due entry)

-- head fields written once at the end (field, value, ...)
local head_set = {}

-- A new sequence. `full`: this add fills it at once, so it is written sealed right away (never
-- accumulating: no head 'acc', no open list, no timer) and the caller only queues it as due.
local function open_sequence(full)
  local seq = next_free_seq(pfx, head, base)
  local member = member_of(base, seq)
  if full then
    local fid = flush_id_of(pfx, base, seq, now * 1000 + sub)
    redis.call('HSET', pfx .. 's:' .. member, 'created_at', int(now), 'attempt', 0, 'max', max,
      'interval', interval, unpack(sealed_fields(max, 'size', now, fid)))
    table.insert(head_set, 'a:' .. seq)
    table.insert(head_set, 'flushing')
    if #head_set >= 2000 then  -- unpack() has a limit: many tiny sequences are written in parts
      redis.call('HSET', head, unpack(head_set))
      head_set = {}
    end
  else
    local state = {'status', 'accumulating', 'created_at', int(now), 'updated_at', int(now), 'attempt', 0,
      'max', max, 'interval', interval}
    local header = open_header(seq, now, max)
    if idle then
      scap = interval >= 0 and int(now + interval) or '0'
      header = header .. '/' .. scap
      table.insert(state, 'idle')
      table.insert(state, idle)
    end
    redis.call('HSET', pfx .. 's:' .. member, unpack(state))
    redis.call('HSET', head, 'acc', seq, 'a:' .. seq, 'accumulating')
    -- the open list does not exist here (it is renamed at sealing); LPUSH rather than RPUSH
    -- so that, were it ever left behind, its entries would be delivered, never overwritten
    redis.call('LPUSH', okey, header)
    opened = true
  end
  if redis.call('HINCRBY', head, 'active', 1) == 1 then
    redis.call('SADD', ids, base)
    redis.call('PERSIST', head)
    redis.call('PERSIST', hist)
  end
  if (interval >= 0 or idle) and not full then
    redis.call('ZADD', due, idle and idle_due(now, idle, tonumber(scap)) or int(now + interval), member)
    -- an idle worker sleeps until the earliest due entry: tell it when that changed
    if redis.call('ZRANGE', due, 0, 0)[1] == member then
      wake = true
    end
  end
  return seq
end

-- The accumulating sequence's item count, max_batch_size and flush_idle cap (open_items_of).
-- Should its open list be missing (the head names a sequence, yet no add ever created it), it is
-- started with its header, so no item is ever pushed without one; a damaged header is
-- rewritten, its items kept for the sequence (and its due entry left where it is).
local function open_count(seq)
  local n, _, how = open_items_of(pfx, base, seq, seq)
  if how == 'own' then
    local _, smax, cap = parse_header(redis.call('LINDEX', okey, 0))
    return n, smax or max, cap and int(cap)
  end
  if how == 'damaged' then
    redis.call('LSET', okey, 0, open_header(seq, now, max))
  else
    redis.call('LPUSH', okey, open_header(seq, now, max))
  end
  return n, max
end

-- one segment per caller (group commit): each gets its own result and its own max_pending check
local segs = {}
if segments == '-' then
  segs[1] = last - first + 1
else
  for n in string.gmatch(segments, '%d+') do table.insert(segs, tonumber(n)) end
end

local seq = state[1]   -- the accumulating sequence (nil: none yet)
local count = nil      -- its length, when known
local smax = max       -- its max_batch_size
if seq then seq = tonumber(seq) end
-- undelivered items of the base id: the sealed sequences' (head 'pending') and the open one's
local pending = tonumber(state[2] or '0')
if max_pending >= 0 and seq then
  count, smax, scap = open_count(seq)
  pending = pending + count
end
local fresh_items = 0    -- items written into sequences sealed from the start
local touched = false    -- the open list got items: its header's time is updated at the end
local any_sealed = false
local out = {}
local i = first
for _, n in ipairs(segs) do
  local stop = i + n - 1
  if max_pending >= 0 and pending + n > max_pending then
    table.insert(out, 'full,' .. int(pending))
  else
    pending = pending + n
    local res_seq, res_count, status, sealed = seq, count, 'accumulating', 0
    while i <= stop do
      local fresh = false  -- opened by this add and filled at once: already written sealed
      if not seq then
        fresh = stop - i + 1 >= max
        seq = open_sequence(fresh)
        count, smax = 0, max
        if not fresh then
          -- entries an open list held already (left by a sequence that was not sealed from
          -- it) stay first and count: delivered with this one
          count = redis.call('LLEN', okey) - 1
        end
      end
      local member = member_of(base, seq)
      local key = fresh and pfx .. 'i:' .. member or okey
      if count == nil then count, smax, scap = open_count(seq) end
      local take = math.max(math.min(smax - count, stop - i + 1), 0)
      local j = i
      while j < i + take do
        local k = math.min(j + 4999, i + take - 1)
        redis.call('RPUSH', key, unpack(ARGV, j, k))
        j = k + 1
      end
      count = count + take
      i = i + take
      touched = touched or not fresh
      res_seq, res_count = seq, count
      if count >= smax then
        if fresh then
          redis.call('ZADD', due, int(now), member)
          fresh_items = fresh_items + count
        else
          res_count = seal(pfx, head, due, base, seq, count, 'size', now, sub)
          touched = false
        end
        sealed = sealed + 1
        status = 'flushing'
        seq, count, scap, opened = nil, nil, nil, false
      else
        status = 'accumulating'
      end
    end
    if sealed > 0 then any_sealed = true end
    table.insert(out, int(res_seq) .. ',' .. int(res_count) .. ',' .. (status == 'flushing' and 'F' or 'A')
      .. ',' .. int(sealed) .. ',' .. int(n))
  end
  i = stop + 1
end
if #head_set > 0 then
  redis.call('HSET', head, unpack(head_set))
end
if fresh_items > 0 then
  pending_delta(pfx, head, fresh_items)
end
if seq and touched then
  redis.call('LSET', okey, 0, open_header(seq, now, smax) .. (scap and '/' .. scap or ''))
  if idle and scap and not opened then
    redis.call('ZADD', due, 'XX', idle_due(now, idle, tonumber(scap)), member_of(base, seq))
  end
end
if any_sealed or wake then
  wake_workers(pfx)
end
return table.concat(out, ';')
