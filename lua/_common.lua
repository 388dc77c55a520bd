-- _common.lua: helpers prepended by redis_batcher/scripts.py to each script that uses them
-- (each "local function" block up to the next one is included when its name is used).
--
-- Key layout (pfx = "<prefix>:{<processor>:<partition>}:", one hash tag per partition):
--   pfx.."due"            ZSET  member "base::N", score = due time / lease expiry (ms, server clock)
--   pfx.."ids"            SET   base ids with at least one active sequence
--   pfx.."b:"..base       HASH  head: next, acc, active, pending, a:<N> = status, done_seq, ...
--                               (pending: the undelivered items of its sealed sequences)
--   pfx.."h:"..base       LIST  flush history, newest first (JSON)
--   pfx.."s:"..base.."::"..N  HASH  sequence state: status, cutoff, window, attempt, deaths,
--                               max (the max_batch_size it was opened with), ...
--   pfx.."o:"..base       LIST  the accumulating sequence's list: a header
--                               "<N>:<last add ms>/<max_batch_size>", then its encoded items in
--                               add order (exists iff head has acc)
--   pfx.."i:"..base.."::"..N  LIST  a sealed sequence's encoded items in add order (the o: list
--                               renamed at sealing, its header dropped)
--   pfx.."dead"           ZSET  dead-letter ids, score = time they died (ms)
--   pfx.."d:"..id         HASH  dead letter: batch_id, sequence, count, error, reason, ...
--   pfx.."di:"..id        LIST  its items
--   pfx.."woke"           STRING  the wake-up token: set while a wake-up is unanswered; one
--                               woken worker takes it (DEL) and claims
--   pfx.."wake"           the partition's wake-up channel (sharded pub/sub on Redis 7+)
-- Keys derived here from pfx always carry the same hash tag as the declared KEYS.
--
-- A sealed sequence's list holds `cutoff` undelivered items at its head. Each claim delivers the
-- first `window` of them (window <= cutoff, <= the sequence's max). Acks, partial failures and
-- dead-lettering remove items from the head; what is left is delivered next. The first `fid_n`
-- items were delivered under `flush_id`: they keep it on every redelivery (bisected or not).
-- `attempt` counts deliveries of those items (what handlers see); `tries` counts the failed
-- ones that spend the max_attempts budget (bisection steps do not), `deaths` the deliveries
-- whose worker died.
--
-- `flush_id` (what handlers deduplicate by) is decided when the sequence is sealed, written
-- with the sealed state by whatever seals it (add.lua at max_batch_size, flush.lua, the claim
-- that finds an interval due, replay.lua), and only read by the claims that deliver it: a claim
-- that a failover lost, or whose worker died, is redelivered under the same id. It is
--   "<sealed at, in us>-<tag>-<N>"    e.g. "1795956439667412-d8d3bd6517c8-0"
-- the sealing call's TIME in microseconds, 12 hex digits of the SHA-1 of pfx..base (prefix,
-- processor, partition and base id; a 48-bit hash of the same where redis.sha1hex is missing,
-- as in test doubles) and the sequence number. Sequences sealed by one call share its time and
-- differ in base id (by its tag: equal tags, 1 in 2^48) or number; a base id deleted or expired
-- seals its restarted numbers at later times. Once the first `fid_n` items have all left the sequence, the rest is a new
-- flush under the sealed id plus "-<k>" (`fid_k` = k = 1, 2, ...), written by the call that
-- removed them, so it too is fixed before any claim. (A sequence sealed by a version from
-- before this keeps the id it was claimed under; one without any gets the id its `sealed_at`
-- ms gives, at its first claim.)
--
-- Data this library did not write -- a key of another type, a field that is not a number, a
-- damaged header -- is found by reading before a script writes anything, so no script stops
-- half-way: the caller is told (a 'corrupt' reply), or a due sequence that cannot be delivered
-- as it is goes to the dead-letter store with reason 'quarantine' (by the claim).
--
-- Work per call is bounded: moving part of a window out of a list (dead-lettering a window
-- smaller than its list, a partial failure, undecodable entries) is a move job kept in the
-- sequence's state (mv_* fields) and done a bounded number of items per call, by the nack and
-- then by the claims that find the sequence due.
-- (Helper names are never written out in this header: scripts.py links every helper that the
-- header names into every script.)
--
-- Shared constants live here, in the header that every script gets (scripts.py links each
-- helper with the lines that follow it, up to the next one).

-- (Tables are built where they are used, not here: what is here runs on every call of every
-- script.)
-- The state fields the scripts compute with, each between spaces (a plain find, no table);
-- the kinds of move jobs.
local SEQ_INT_FIELDS = ' cutoff window attempt tries deaths fid_n fid_k delivered claimed_at max mv_w mv_done mv_keep mv_rest mv_rot mv_out mv_at '
local MOVE_KINDS = ' KD XD XK XX '
-- Items a call moves at most (move jobs): each costs a few hundred ns of server time.
local MOVE_BUDGET = 10000
-- Dead letters dropped at most per new one, by age or number.
local DEAD_PRUNE = 100
-- A claim looks this many entries past its limit; BACKLOG_DUE is its reply when it found them.
local BACKLOG, BACKLOG_DUE = 8, -2
-- A claim's reply when the partition's own keys hold something else.
local CORRUPT_DUE = -3
-- How long a wake-up token (pfx.."woke") lives when no worker takes it.
local WAKE_HOLD_MS = 100

-- The server's time in ms, and the microseconds past that ms (a flush_id's time is
-- ms * 1000 + us).
local function now_ms()
  local t = redis.call('TIME')
  local us = tonumber(t[2])
  return tonumber(t[1]) * 1000 + math.floor(us / 1000), us % 1000
end

local function int(n)
  return string.format('%d', n)
end

local function member_of(base, seq)
  return base .. '::' .. seq
end

local function split_member(member)
  local base, seq = string.match(member, '^(.*)::(%d+)$')
  if base == '' or (seq and #seq > 15) then return nil, nil end
  return base, seq
end

-- A value read from Redis, for an error message: quoted, at most 40 bytes.
local function quote(v)
  if not v then return 'nil' end
  if #v > 40 then v = string.sub(v, 1, 40) .. '...' end
  return string.format('%q', v)
end

-- The type of a key: 'none' when it does not exist.
local function key_type(key)
  return redis.call('TYPE', key)['ok']
end

-- nil when each key is missing or of its type; else what is wrong with the first one that is
-- not. checks: {key, type, key, type, ...}
local function wrong_type(checks)
  for i = 1, #checks, 2 do
    local t = redis.call('TYPE', checks[i])['ok']
    if t ~= 'none' and t ~= checks[i + 1] then
      return checks[i] .. ' is a ' .. t .. ', not a ' .. checks[i + 1]
    end
  end
  return nil
end

-- A value the scripts wrote as a decimal integer (nil: absent, fine).
local function is_int(v)
  return not v or (string.match(v, '^%-?%d+$') ~= nil and #v <= 17)
end

-- nil when each named field of `key` is absent or a decimal integer, as the scripts write them;
-- else what is wrong with the first one that is not. The key must be a hash (or missing).
local function bad_ints(key, names)
  local v = redis.call('HMGET', key, unpack(names))
  for i, name in ipairs(names) do
    if not is_int(v[i]) then
      return key .. ' field ' .. name .. ' is ' .. quote(v[i]) .. ', not an integer'
    end
  end
  return nil
end

-- A base id's head, read once: {next, acc, active, pending, done_seq, done_items} (nil fields:
-- absent), or nil and what is wrong with it (another type, a field that is not an integer).
local function head_state(head)
  local v = redis.pcall('HMGET', head, 'next', 'acc', 'active', 'pending', 'done_seq', 'done_items')
  if v.err then
    return nil, head .. ' is a ' .. key_type(head) .. ', not a hash'
  end
  for i = 1, 6 do
    if not is_int(v[i]) then
      return nil, head .. ' holds ' .. quote(v[i]) .. ' where an integer belongs'
    end
  end
  return v, nil
end

-- nil when a base id's head is missing or sound, else what is wrong with it.
local function head_problem(head)
  local _, why = head_state(head)
  return why
end

-- A sequence's state, read once (HGETALL) as a table of its fields ({} when it has none), and
-- its list's length; or nil, nil and what is wrong with them (another type, a number field
-- that is not one, a status or move job this library does not write, or the keys of the dead
-- letter an unfinished move job fills).
local function seq_state(pfx, member)
  local meta = pfx .. 's:' .. member
  local flat = redis.pcall('HGETALL', meta)
  if flat.err then
    return nil, nil, meta .. ' is a ' .. key_type(meta) .. ', not a hash'
  end
  local llen = redis.pcall('LLEN', pfx .. 'i:' .. member)
  if type(llen) == 'table' then
    return nil, nil, pfx .. 'i:' .. member .. ' is a ' .. key_type(pfx .. 'i:' .. member) .. ', not a list'
  end
  local f = {}
  for i = 1, #flat, 2 do
    local k, v = flat[i], flat[i + 1]
    f[k] = v
    if string.find(SEQ_INT_FIELDS, ' ' .. k .. ' ', 1, true) and not is_int(v) then
      return nil, nil, meta .. ' field ' .. k .. ' is ' .. quote(v) .. ', not an integer'
    end
  end
  if f.status and f.status ~= 'accumulating' and f.status ~= 'flushing' then
    return nil, nil, meta .. ' field status is ' .. quote(f.status)
  end
  if f.mv then
    if not string.find(MOVE_KINDS, ' ' .. f.mv .. ' ', 1, true) or (f.mv_end ~= 'retry'
        and f.mv_end ~= 'advance') or (string.sub(f.mv, 1, 1) == 'X' and not f.mv_dead) then
      return nil, nil, meta .. ' holds a move job ' .. quote(f.mv) .. ' this library did not write'
    end
    if f.mv_dead then
      local why = wrong_type({pfx .. 'd:' .. f.mv_dead, 'hash', pfx .. 'di:' .. f.mv_dead, 'list'})
      if why then return nil, nil, why end
    end
  end
  return f, llen, nil
end

-- nil when a sequence's state and items are missing or sound, else what is wrong with them.
local function seq_problem(pfx, member)
  local _, _, why = seq_state(pfx, member)
  return why
end

-- nil when a partition's own keys are missing or of their types, else what is wrong (a count of
-- each, which fails on another type, is cheaper than TYPE).
local function partition_problem(pfx)
  local due, ids, dead = pfx .. 'due', pfx .. 'ids', pfx .. 'dead'
  if type(redis.pcall('ZCARD', due)) == 'table' or type(redis.pcall('SCARD', ids)) == 'table'
      or type(redis.pcall('ZCARD', dead)) == 'table' then
    return wrong_type({due, 'zset', ids, 'set', dead, 'zset'})
  end
  return nil
end

-- History is advisory: an entry is not written where the key holds something else.
local function push_history(hist, entry, cap)
  local t = key_type(hist)
  if t ~= 'list' and t ~= 'none' then return end
  if redis.call('LPUSH', hist, entry) > cap then
    redis.call('LTRIM', hist, 0, cap - 1)
  end
end

-- The next sequence number of a base id (HINCRBY of the head's next). A number whose keys exist
-- already (left by something else) is skipped, never written over.
local function next_free_seq(pfx, head, base)
  local seq = redis.call('HINCRBY', head, 'next', 1) - 1
  local tries = 0
  while redis.call('EXISTS', pfx .. 's:' .. member_of(base, seq), pfx .. 'i:' .. member_of(base, seq)) > 0
      and tries < 100 do
    seq = redis.call('HINCRBY', head, 'next', 1) - 1
    tries = tries + 1
  end
  return seq
end

-- The head's side of sealing: the sequence no longer takes adds and is indexed as flushing.
local function seal_head(head, seq)
  if redis.call('HGET', head, 'acc') == tostring(seq) then
    redis.call('HDEL', head, 'acc')
  end
  redis.call('HSET', head, 'a:' .. seq, 'flushing')
end

-- The flush_id of sequence `seq` of a base id, sealed at `us` (microseconds, server clock):
-- "<us>-<tag>-<N>" (see the top). Costs a hash of pfx..base, paid when sealing only.
local function flush_id_of(pfx, base, seq, us)
  local s, tag = pfx .. base, nil
  if redis.sha1hex then
    tag = string.sub(redis.sha1hex(s), 1, 12)
  else
    -- test doubles without redis.sha1hex: two 24-bit polynomial hashes
    local a, b = 0, 0
    for i = 1, #s do
      local c = string.byte(s, i)
      a, b = (a * 257 + c) % 16777213, (b * 263 + c) % 16777199
    end
    tag = string.format('%06x%06x', a, b)
  end
  return int(us) .. '-' .. tag .. '-' .. int(seq)
end

-- The sequence-hash fields of a sealed sequence (field, value, ...), ready for HSET; fid: the
-- flush_id it gets (flush_id_of).
local function sealed_fields(count, reason, now, fid)
  return {'status', 'flushing', 'cutoff', count, 'sealed_at', int(now), 'reason', reason,
    'updated_at', int(now), 'flush_id', fid}
end

-- The header entry of a base id's open list (index 0): the accumulating sequence's number, the
-- time of its last add (ms, 13 digits: the entry keeps its size when LSET rewrites it) and the
-- max_batch_size it was opened with (a producer configured otherwise still seals it there).
local function open_header(seq, now, max)
  return seq .. ':' .. int(now) .. '/' .. max
end

-- The sequence number and max_batch_size an open-list header names (max nil: a header from
-- before it carried one); nil when it is not a header.
local function parse_header(header)
  local seq, max = string.match(header, '^(%d+):%d+/?(%d*)$')
  if not seq or #seq > 15 or #max > 15 then return nil, nil end
  return seq, tonumber(max)
end

-- The items of the base id's open list that belong to sequence `seq` (the list minus its
-- header), the list's key, and how they were found:
--   'own'      the header names seq
--   'damaged'  the header names nothing (or another sequence) but seq is the head's
--              accumulating one (acc): every entry after index 0 is still its item
--   'none'     no open list; 'other': the list is another sequence's, never touched for seq
-- The list must be a list or missing (checked by the caller).
local function open_items_of(pfx, base, seq, acc)
  local okey = pfx .. 'o:' .. base
  local header = redis.call('LINDEX', okey, 0)
  if not header then
    return 0, okey, 'none'
  end
  local hseq = parse_header(header)
  if hseq == tostring(seq) then
    return redis.call('LLEN', okey) - 1, okey, 'own'
  end
  if acc and tostring(acc) == tostring(seq) then
    return redis.call('LLEN', okey) - 1, okey, 'damaged'
  end
  return 0, okey, 'other'
end

-- The items of a base id's accumulating sequence become the sealed sequence's list: the open
-- list is renamed (O(1), whatever its length) and its header dropped; they now count as the
-- head's pending. count: the open list's items for seq (open_items_of). Should the sequence's
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

-- Seal an accumulating sequence: it becomes 'flushing' with its cutoff and flush_id recorded
-- and is due now. count: its open list's items (see seal_items); now, sub: the time in ms and
-- the microseconds past it. Returns the sealed sequence's item count.
local function seal(pfx, head, due, base, seq, count, reason, now, sub)
  local member = member_of(base, seq)
  local total = seal_items(pfx, head, base, seq, count)
  redis.call('HSET', pfx .. 's:' .. member, unpack(sealed_fields(total, reason, now,
    flush_id_of(pfx, base, seq, now * 1000 + sub))))
  seal_head(head, seq)
  redis.call('ZADD', due, int(now), member)
  return total
end

-- Wake the workers serving a partition: its pfx as a message on its channel pfx.."wake" (the
-- partition's hash tag, so the script's own slot). Redis 7+ (redis.REDIS_VERSION_NUM is set):
-- SPUBLISH, sharded pub/sub, delivered by the slot's own node to its subscribers and never
-- broadcast over a cluster's bus; older servers, or one that refuses SPUBLISH: PUBLISH on the
-- same name. Workers subscribe the same way (redis_batcher.wake).
local function publish_wake(pfx)
  local channel = pfx .. 'wake'
  if redis.REDIS_VERSION_NUM and type(redis.pcall('SPUBLISH', channel, pfx)) == 'number' then
    return
  end
  redis.call('PUBLISH', channel, pfx)
end

-- The wake-up token. A wake-up is a token, pfx.."woke" (set for at most WAKE_HOLD_MS): of the
-- workers it wakes, only the one that takes the token (a DEL that answers 1, by a worker with
-- a free slot: redis_batcher.worker_core) claims; the others go back to waiting. While the token
-- is out, a seal publishes nothing more (the worker that takes it will claim what is due then,
-- up to its free slots); each claim is done with it (see below).
local function wake_workers(pfx)
  if redis.call('SET', pfx .. 'woke', '1', 'NX', 'PX', WAKE_HOLD_MS) then
    publish_wake(pfx)
  end
end

-- A wake-up whatever the token's state (a manual flush, a release, a replay): the token is set
-- and published, so that one worker claims.
local function wake_always(pfx)
  redis.call('SET', pfx .. 'woke', '1', 'PX', WAKE_HOLD_MS)
  publish_wake(pfx)
end

-- A claim is done with the partition's wake-up token. It left due entries it could not take
-- (`more`: it found more than its limit, the asking worker's free slots): the token goes out
-- again, so that another worker with a free slot takes the rest (unless one is out already).
-- Else it is deleted: the claimer knows all that is due, so the next seal publishes again.
local function answer_wake(pfx, more)
  if more then
    wake_workers(pfx)
  else
    redis.call('DEL', pfx .. 'woke')
  end
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
    if key_type(meta) == 'hash' and redis.call('HGET', meta, 'parked') == '1' then
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
-- cfg: {retention=, ordered=, max=}; known: {cutoff, fid_n, max, flush_id, fid_k} when the
-- caller has read them; done: the sequence's delivered item count when an ack completes it
-- (the head then records the highest completed sequence: done_seq, done_items, done_at)
local function advance(pfx, base, seq, n, now, cfg, known, done)
  local member = member_of(base, seq)
  local meta = pfx .. 's:' .. member
  local head = pfx .. 'b:' .. base
  local due = pfx .. 'due'
  local f = known or redis.call('HMGET', meta, 'cutoff', 'fid_n', 'max', 'flush_id', 'fid_k')
  local left = tonumber(f[1] or '0') - n
  if left > 0 then
    local pending = redis.call('HINCRBY', head, 'pending', int(-n))
    if pending < 0 then redis.call('HSET', head, 'pending', 0) end
    redis.call('HSET', meta, 'cutoff', left, 'window', math.min(left, tonumber(f[3] or cfg.max)),
      'owner', '', 'updated_at', int(now))
    redis.call('HDEL', meta, 'lease_until', 'next_attempt_at')
    -- items already delivered under a flush_id keep it (and their attempt count) until they
    -- leave the sequence, so a handler can always recognise a redelivery
    local fid_n = tonumber(f[2] or '0') - n
    if fid_n > 0 then
      redis.call('HSET', meta, 'fid_n', fid_n)
    elseif f[4] then
      -- the rest is a new flush: the sealed flush_id plus "-<k>", fixed here, before its claim
      -- (the current one is the sealed id plus "-<fid_k>" when fid_k is set)
      local id, k = f[4], tonumber(f[5] or '0')
      if k > 0 then id = string.sub(id, 1, #id - #int(k) - 1) end
      redis.call('HSET', meta, 'attempt', 0, 'tries', 0, 'deaths', 0, 'flush_id', id .. '-' .. int(k + 1),
        'fid_k', int(k + 1))
      redis.call('HDEL', meta, 'fid_n', 'last_error')
    else
      -- never delivered under an id (sealed by an older version): its claim gives it one
      redis.call('HSET', meta, 'attempt', 0, 'tries', 0, 'deaths', 0)
      redis.call('HDEL', meta, 'fid_n', 'last_error')
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

-- A dead-letter id that names no dead letter yet, from `id`.
local function fresh_dead_id(pfx, id)
  local n, out = 0, id
  while redis.call('EXISTS', pfx .. 'd:' .. out, pfx .. 'di:' .. out) > 0 do
    n = n + 1
    out = id .. '~' .. n
  end
  return out
end

-- Dead letters are kept for at most dead.ttl ms (0: for ever) and at most dead.max of them per
-- partition (0: no limit): each new one drops at most DEAD_PRUNE of the oldest past either.
local function prune_dead(pfx, dead, now)
  local zkey = pfx .. 'dead'
  local drop = {}
  if dead.ttl > 0 then
    drop = redis.call('ZRANGEBYSCORE', zkey, '-inf', int(now - dead.ttl), 'LIMIT', 0, DEAD_PRUNE)
  end
  if dead.max > 0 and #drop < DEAD_PRUNE then
    local over = redis.call('ZCARD', zkey) - #drop - dead.max
    if over > 0 then
      drop = redis.call('ZRANGE', zkey, 0, math.min(over + #drop, DEAD_PRUNE) - 1)
    end
  end
  for _, id in ipairs(drop) do
    redis.call('ZREM', zkey, id)
    redis.call('UNLINK', pfx .. 'd:' .. id, pfx .. 'di:' .. id)
  end
end

-- Record a dead letter whose items are in pfx.."di:"..id already (`count` of them).
-- f: {tries, deaths, flush_id, created_at} of the sequence; dead: {ttl, max} (prune_dead).
local function register_dead(pfx, id, base, seq, count, reason, err, f, now, dead)
  local dmeta = pfx .. 'd:' .. id
  redis.call('HSET', dmeta, 'batch_id', base, 'sequence', seq, 'count', count,
    'reason', reason, 'error', err or '', 'attempts', f.tries or 0, 'deaths', f.deaths or 0,
    'flush_id', f.flush_id or '', 'created_at', f.created_at or '', 'dead_at', int(now))
  redis.call('ZADD', pfx .. 'dead', int(now), id)
  if dead.ttl > 0 then
    redis.call('PEXPIRE', dmeta, dead.ttl)
    redis.call('PEXPIRE', pfx .. 'di:' .. id, dead.ttl)
  end
  prune_dead(pfx, dead, now)
end

-- Move a sequence's whole list into a new dead letter (RENAME: O(1) whatever its length).
-- Returns the dead letter's id.
local function bury_list(pfx, id, member, count, reason, err, f, now, dead)
  local base, seq = split_member(member)
  id = fresh_dead_id(pfx, id)
  if count > 0 then
    redis.call('RENAME', pfx .. 'i:' .. member, pfx .. 'di:' .. id)
  end
  register_dead(pfx, id, base, seq, count, reason, err, f, now, dead)
  return id
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

-- Move jobs (see the top): the first mv_w items of a sequence's list (the window) are taken
-- from its head one by one; each goes to the fate of its kind -- 'K' kept (pushed to the list's
-- tail, behind the rest), 'D' dropped (delivered), 'X' to the dead letter mv_dead's list. mv is
-- two letters: the fate of the marked items (bit i of mv_marks, LSB first, for window item i;
-- no mv_marks: every item is marked), then of the others. Then the kept items are brought back
-- before the rest (mv_rest items; the shorter side is moved) and mv_end finishes the job.
-- A move job's fields in the sequence's state.
local function move_fields()
  return {'mv', 'mv_w', 'mv_done', 'mv_keep', 'mv_rest', 'mv_rot', 'mv_out', 'mv_dead', 'mv_marks',
    'mv_end', 'mv_at', 'mv_err', 'mv_reason'}
end

local function marked(marks, i)
  if not marks then return true end
  local b = string.byte(marks, math.floor(i / 8) + 1)
  return b ~= nil and math.floor(b / 2 ^ (i % 8)) % 2 == 1
end

-- The job of a sequence (nil when none), from its state.
-- f: the sequence's fields (seq_state).
local function move_job(f)
  if not f.mv then return nil end
  return {mv = f.mv, w = tonumber(f.mv_w), done = tonumber(f.mv_done or '0'), keep = tonumber(f.mv_keep or '0'),
    rest = tonumber(f.mv_rest or '0'), rot = tonumber(f.mv_rot or '0'), out = tonumber(f.mv_out or '0'),
    dead = f.mv_dead, marks = f.mv_marks, finish = f.mv_end, at = tonumber(f.mv_at or '0'), err = f.mv_err,
    reason = f.mv_reason}
end

-- Work on a job for at most `budget` items; returns the work done and whether it is finished.
local function move_step(pfx, member, j, budget)
  local ikey = pfx .. 'i:' .. member
  local dlist = j.dead and (pfx .. 'di:' .. j.dead)
  local fm, fu = string.sub(j.mv, 1, 1), string.sub(j.mv, 2, 2)
  local work = 0
  while j.done < j.w and work < budget do
    local items = redis.call('LPOP', ikey, math.min(j.w - j.done, budget - work, 5000))
    if not items then
      j.done = j.w  -- the list ran out (evicted?): nothing more to take
      break
    end
    local keep, out = {}, {}
    for k, it in ipairs(items) do
      local fate = marked(j.marks, j.done + k - 1) and fm or fu
      if fate == 'K' then
        keep[#keep + 1] = it
      elseif fate == 'X' then
        out[#out + 1] = it
      end
    end
    if #keep > 0 then redis.call('RPUSH', ikey, unpack(keep)) end
    if #out > 0 then redis.call('RPUSH', dlist, unpack(out)) end
    j.done, j.keep, j.out = j.done + #items, j.keep + #keep, j.out + #out
    work = work + #items
  end
  if j.done < j.w then return work, false end
  -- the list is now the rest, then the kept items: move the shorter side round
  local turn = math.min(j.keep, j.rest)
  local from, to = 'RIGHT', 'LEFT'
  if j.keep > j.rest then from, to = 'LEFT', 'RIGHT' end
  while j.rot < turn and work < budget do
    redis.call('LMOVE', ikey, ikey, from, to)
    j.rot, work = j.rot + 1, work + 1
  end
  return work, j.rot >= turn
end

-- Persist an unfinished job's progress; the sequence stays due now, without an owner, so the
-- next claim of any worker goes on with it.
local function move_later(pfx, member, j, now)
  redis.call('HSET', pfx .. 's:' .. member, 'mv_done', j.done, 'mv_keep', j.keep, 'mv_rot', j.rot,
    'mv_out', j.out, 'owner', '', 'updated_at', int(now))
  redis.call('HDEL', pfx .. 's:' .. member, 'lease_until')
  redis.call('ZADD', pfx .. 'due', int(now), member)
end

-- Claim options from ARGV[i..i+12] (claim.lua's ARGV[2..14]; ack.lua's optional ARGV[9..21]).
local function claim_opts(i)
  return {limit = tonumber(ARGV[i]), lease = tonumber(ARGV[i + 1]), owner = ARGV[i + 2],
    seed = ARGV[i + 3], max_deaths = tonumber(ARGV[i + 6]), bisect = ARGV[i + 7] == '1',
    cap = tonumber(ARGV[i + 9]), inline_max = tonumber(ARGV[i + 10] or '0'),
    dead = {ttl = tonumber(ARGV[i + 11] or '0'), max = tonumber(ARGV[i + 12] or '0')},
    cfg = {retention = tonumber(ARGV[i + 4]), max = tonumber(ARGV[i + 5]), ordered = ARGV[i + 8] == '1'}}
end

-- Finish a job: its window's items went where the job said. mv_end:
--   'retry'    a partial failure: the failed items stay first, due again at mv_at
--   'advance'  the items that left the window are done with (advance)
-- Returns the outcome and its detail, as nack.lua replies.
local function move_finish(pfx, member, j, now, cfg, dead)
  local base, seq = split_member(member)
  local meta = pfx .. 's:' .. member
  local f = redis.call('HMGET', meta, 'cutoff', 'fid_n', 'max', 'tries', 'deaths', 'flush_id',
    'created_at', 'fid_k')
  redis.call('HDEL', meta, unpack(move_fields()))
  if j.dead then
    if j.out > 0 then
      register_dead(pfx, j.dead, base, seq, j.out, j.reason, j.err, {tries = f[4], deaths = f[5],
        flush_id = f[6], created_at = f[7]}, now, dead)
    else
      redis.call('DEL', pfx .. 'di:' .. j.dead)
    end
  end
  local gone = j.w - j.keep  -- the window's items that left the sequence
  local dropped = gone - j.out  -- of which delivered (a partial failure's others)
  if dropped > 0 then redis.call('HINCRBY', meta, 'delivered', dropped) end
  if j.finish == 'retry' then
    local head = pfx .. 'b:' .. base
    if redis.call('HINCRBY', head, 'pending', int(-gone)) < 0 then redis.call('HSET', head, 'pending', 0) end
    local cutoff = tonumber(f[1]) - gone
    if j.keep == 0 then
      -- none failed: the window's items all left (its flush_id with them, unless the rest was
      -- delivered under it too)
      redis.call('HSET', meta, 'cutoff', cutoff)
      return 'delivered', advance(pfx, base, seq, 0, now, cfg,
        {cutoff, tonumber(f[2] or '0') - gone, f[3], f[6], f[8]})
    end
    -- the failed items stay at the head and keep their flush_id
    redis.call('HSET', meta, 'cutoff', cutoff, 'window', j.keep,
      'fid_n', math.max(tonumber(f[2] or '0') - gone, j.keep), 'owner', '', 'last_error', j.err,
      'next_attempt_at', int(j.at), 'updated_at', int(now))
    redis.call('HDEL', meta, 'lease_until')
    redis.call('ZADD', pfx .. 'due', int(j.at), member)
    return 'retry', j.at
  end
  local left = advance(pfx, base, seq, gone, now, cfg, {f[1], f[2], f[3], f[6], f[8]})
  if j.reason == 'decode_error' then return 'quarantined', left end
  return 'dead', left
end

-- Start a move job on a sealed sequence and work on it for up to `budget` items; returns
-- nack.lua's outcome and detail ('moving', items still to move, when unfinished).
-- job: {mv, w, marks, dead (id or nil), finish, at, err, reason}
local function move_start(pfx, member, job, now, cfg, dead, budget)
  local meta = pfx .. 's:' .. member
  job.rest = redis.call('LLEN', pfx .. 'i:' .. member) - job.w
  if job.rest < 0 then
    job.w, job.rest = job.w + job.rest, 0
  end
  job.done, job.keep, job.rot, job.out = 0, 0, 0, 0
  local fields = {'mv', job.mv, 'mv_w', job.w, 'mv_rest', job.rest, 'mv_end', job.finish,
    'mv_at', int(job.at or 0), 'mv_err', job.err or '', 'mv_reason', job.reason or ''}
  if job.dead then
    job.dead = fresh_dead_id(pfx, job.dead)
    table.insert(fields, 'mv_dead')
    table.insert(fields, job.dead)
  end
  if job.marks then
    table.insert(fields, 'mv_marks')
    table.insert(fields, job.marks)
  end
  redis.call('HSET', meta, unpack(fields))
  local _, finished = move_step(pfx, member, job, budget)
  if finished then
    return move_finish(pfx, member, job, now, cfg, dead)
  end
  move_later(pfx, member, job, now)
  return 'moving', job.w - job.done + math.min(job.keep, job.rest) - job.rot
end

-- Dead-letter the first `window` items of a sealed sequence: its whole list at once when that is
-- all it holds, else a move job. Returns nack.lua's outcome and detail.
local function bury_window(pfx, id, member, window, reason, err, f, now, cfg, dead, budget)
  local base, seq = split_member(member)
  if window >= redis.call('LLEN', pfx .. 'i:' .. member) then
    bury_list(pfx, id, member, window, reason, err, f, now, dead)
    return 'dead', advance(pfx, base, seq, window, now, cfg)
  end
  return move_start(pfx, member, {mv = 'XX', w = window, dead = id, finish = 'advance', err = err,
    reason = reason}, now, cfg, dead, budget)
end

-- Take a due member that cannot be delivered as it is out of the delay queue, into a dead
-- letter with reason 'quarantine' and `why` as its error: with its sealed items where its list
-- is a list, and the facts of its state where that is a hash (the state is then dropped, so no
-- later claim trips over it). Keys of another type stay as they are, for the operator to
-- inspect. Returns the dead letter's id.
local function quarantine_member(pfx, member, why, id, now, cfg, dead)
  local due = pfx .. 'due'
  redis.call('ZREM', due, member)
  local base, seq = split_member(member)
  local meta, ikey = pfx .. 's:' .. member, pfx .. 'i:' .. member
  local f = {}
  local status = nil
  if key_type(meta) == 'hash' then
    local v = redis.call('HMGET', meta, 'status', 'tries', 'deaths', 'flush_id', 'created_at')
    status = v[1]
    f = {tries = v[2], deaths = v[3], flush_id = v[4], created_at = v[5]}
    redis.call('DEL', meta)
  end
  local count = 0
  id = fresh_dead_id(pfx, id)
  if key_type(ikey) == 'list' then
    count = redis.call('LLEN', ikey)
    redis.call('RENAME', ikey, pfx .. 'di:' .. id)
  elseif base and status == 'accumulating' and key_type(pfx .. 'o:' .. base) == 'list' then
    -- an accumulating sequence's items, in its base id's open list behind the header
    local okey = pfx .. 'o:' .. base
    if parse_header(redis.call('LINDEX', okey, 0)) == seq then
      count = redis.call('LLEN', okey) - 1
      redis.call('RENAME', okey, pfx .. 'di:' .. id)
      redis.call('LPOP', pfx .. 'di:' .. id)
    end
  end
  register_dead(pfx, id, base or member, seq or -1, count, 'quarantine', why, f, now, dead)
  if base then
    -- the head stops counting the sequence, where the head can be trusted
    local head = pfx .. 'b:' .. base
    if not head_problem(head) and redis.call('HEXISTS', head, 'a:' .. seq) == 1 then
      if status == 'flushing' and count > 0 then
        if redis.call('HINCRBY', head, 'pending', -count) < 0 then redis.call('HSET', head, 'pending', 0) end
      end
      retire(pfx, head, pfx .. 'ids', base, seq, cfg.retention)
      if cfg.ordered then unpark(pfx, head, due, base, now) end
    end
  end
  return id
end

-- Why a due member cannot be delivered as it is (nil when it can): what claim_due reads of it
-- must be what the scripts write.
-- Returns the member's state fields, its list's length and its head's fields (seq_state,
-- head_state), all read before anything is written; or nil and what is wrong.
local function read_member(pfx, member)
  local base = split_member(member)
  if not base then
    return nil, nil, nil, 'the delay-queue member ' .. quote(member) .. ' names no sequence (<batch id>::<N>)'
  end
  local f, llen, why = seq_state(pfx, member)
  if why then return nil, nil, nil, why end
  if not f.status then
    return nil, nil, nil, 'the delay queue names ' .. member .. ', which has no state (' .. pfx .. 's:'
      .. member .. ')'
  end
  local h
  h, why = head_state(pfx .. 'b:' .. base)
  if not why and f.status == 'accumulating' then
    why = wrong_type({pfx .. 'o:' .. base, 'list'})
  end
  if why then return nil, nil, nil, why end
  return f, llen, h, nil
end

-- Take up to o.limit due sequences from a partition's delay queue and lease them to o.owner
-- (claim.lua; ack.lua when the worker asks for its next flush with the ack). Returns claim.lua's
-- reply: {next_due_ms, then six fields per claimed sequence}; next_due_ms is BACKLOG_DUE
-- when at least BACKLOG more sequences were due than it took (a backlog: the worker then
-- spreads them over its threads). Looking BACKLOG entries further with the same ZRANGEBYSCORE
-- also spares the ZRANGE of next_due_ms whenever more is due. The partition's own keys are
-- checked once something is due (BACKLOG_CORRUPT and what is wrong, nothing written); every
-- member is checked before it is written. now, sub: the time in ms and the microseconds past
-- it (an interval seal's flush_id). A flush is delivered under the flush_id its state holds.
local function claim_due(due, pfx, o, now, sub)
  local limit, lease, owner, seed = o.limit, o.lease, o.owner, o.seed
  local cfg, max_deaths, bisect, cap, inline_max = o.cfg, o.max_deaths, o.bisect, o.cap, o.inline_max
  local out = {0}
  local budget = MOVE_BUDGET
  local again = false  -- a move job went on: what is due now may not have been looked at
  local members = redis.call('ZRANGEBYSCORE', due, '-inf', int(now), 'LIMIT', 0, limit + BACKLOG)
  local found = #members
  if found > 0 then
    local why = partition_problem(pfx)
    if why then return {CORRUPT_DUE, why} end
  end
  for n = 1, math.min(found, limit) do
    local member = members[n]
    local meta = pfx .. 's:' .. member
    local base, seq = split_member(member)
    local f, held, h, why = read_member(pfx, member)
    local job = (not why) and move_job(f)
    if why then
      local id = quarantine_member(pfx, member, why, 'q' .. seed .. '-' .. n, now, cfg, o.dead)
      for _, v in ipairs({member, -1, 0, id, 'quarantine', why}) do table.insert(out, v) end
    elseif job then
      -- a move job left unfinished by a nack (or an earlier claim): go on with it
      if budget > 0 then
        local work, finished = move_step(pfx, member, job, budget)
        budget = budget - work
        if finished then
          move_finish(pfx, member, job, now, cfg, o.dead)
        else
          move_later(pfx, member, job, now)
        end
      end
      again = true  -- it may be due now still (or again)
    else
      local head = pfx .. 'b:' .. base
      local ikey = pfx .. 'i:' .. member
      local smax = tonumber(f.max or cfg.max)
      local cutoff = tonumber(f.cutoff)
      local reason = f.reason
      local deliver = true
      local sealing = false
      if f.status == 'accumulating' then
        -- interval timer fired: seal with the current length as the cutoff (the sequence's
        -- own fields and its due entry are written once, with the delivery below); the open
        -- list becomes the sequence's list, so later adds open the next sequence
        local open, okey, how = open_items_of(pfx, base, seq, h[2])
        if how == 'damaged' then
          redis.call('LSET', okey, 0, open_header(seq, now, smax))  -- its items are delivered
        end
        if open == 0 and (how == 'own' or how == 'damaged') then
          redis.call('DEL', okey)  -- its header alone
        end
        cutoff = seal_items(pfx, head, base, seq, open)
        if cutoff > 0 then
          seal_head(head, seq)
          sealing = true
          reason = 'interval'
        end
      elseif not cutoff then
        cutoff = held
        redis.call('HSET', meta, 'cutoff', cutoff)
      end
      local flush_id = f.flush_id
      if sealing then
        flush_id = flush_id_of(pfx, base, seq, now * 1000 + sub)
      elseif not flush_id and f.status == 'flushing' then
        -- sealed by a version from before flush_id was fixed at sealing: the id its seal's ms
        -- gives, the same at every claim until one has written it
        flush_id = flush_id_of(pfx, base, seq, (is_int(f.sealed_at) and tonumber(f.sealed_at or '0') or 0) * 1000)
      end
      local info = {tries = tonumber(f.tries or '0'), deaths = tonumber(f.deaths or '0'), flush_id = flush_id,
        created_at = f.created_at}
      if cutoff == 0 then
        -- nothing to deliver: drop the sequence instead of leaving a due entry that never clears
        redis.call('DEL', meta, ikey)
        redis.call('ZREM', due, member)
        retire(pfx, head, pfx .. 'ids', base, seq, cfg.retention)
        deliver = false
      elseif not sealing then
        if held < cutoff then
          -- items vanished (evicted, deleted): never an empty or short delivery that is then
          -- acknowledged; what is left goes to the dead-letter store
          local err = (cutoff - held) .. ' of ' .. cutoff .. ' items are missing from ' .. ikey
            .. ' (evicted or deleted)'
          bury_list(pfx, (flush_id or (seed .. '-' .. n)) .. '.m' .. cutoff, member, held, 'items_missing',
            err, info, now, o.dead)
          advance(pfx, base, seq, cutoff, now, cfg, {cutoff, f.fid_n, f.max, flush_id, f.fid_k})
          deliver = false
        end
      end
      if deliver and cfg.ordered then
        local low = lowest_active(head)
        if low and low < tonumber(seq) then
          -- an earlier sequence is still in flight or retrying: wait until it is done
          redis.call('ZREM', due, member)
          redis.call('HSET', meta, 'parked', 1)
          if sealing then
            redis.call('HSET', meta, unpack(sealed_fields(cutoff, reason, now, flush_id)))
          end
          deliver = false
        end
      end
      local attempt = tonumber(f.attempt or '0')
      local window = math.min(tonumber(f.window or cutoff), cutoff, smax)
      local fid_n = tonumber(f.fid_n or '0')
      if fid_n > 0 then
        window = math.min(window, fid_n)  -- never mix items of an earlier delivery with new ones
      end
      if deliver and f.owner and f.owner ~= '' then
        -- the previous delivery was never settled: its worker died or lost its lease
        local deaths = tonumber(f.deaths or '0') + 1
        local err = 'worker died or lost its lease during the handler'
        push_history(pfx .. 'h:' .. base, history_entry(seq, window, tonumber(f.claimed_at or now), 0,
          false, err, attempt, flush_id, reason), cap)
        if bisect and window > 1 then
          -- the crash may be caused by one item: deliver the first half on its own (same
          -- flush_id: the dead worker's handler may have processed these items)
          window = math.ceil(window / 2)
          redis.call('HSET', meta, 'deaths', 0, 'last_error', err)
        elseif deaths >= max_deaths then
          info.deaths = deaths
          redis.call('HSET', meta, 'deaths', deaths)  -- what the dead letter records
          if bury_window(pfx, (flush_id or (seed .. '-' .. n)) .. '.' .. cutoff, member, window,
              'max_deaths', f.last_error or err, info, now, cfg, o.dead, budget) == 'moving' then
            again = true
          end
          budget = math.max(budget - window, 0)
          deliver = false
        else
          redis.call('HSET', meta, 'deaths', deaths, 'last_error', err)
        end
      end
      if deliver then
        attempt = attempt + 1
        if fid_n <= 0 then
          fid_n = window  -- the first delivery under flush_id: these items keep it from now on
        end
        local items = 0
        if window <= inline_max then
          items = redis.call('LRANGE', ikey, 0, window - 1)
          if cmsgpack then items = cmsgpack.pack(items) end
        end
        -- the lease, and (after an interval seal) the sealed state with its flush_id, in one
        -- write; a flush_id the state holds is only read (one from sealed_at is written)
        local fields = sealing and sealed_fields(cutoff, reason, now, flush_id) or {'updated_at', int(now)}
        if not sealing and flush_id ~= f.flush_id then
          table.insert(fields, 'flush_id')
          table.insert(fields, flush_id)
        end
        redis.call('HSET', meta, 'attempt', attempt, 'owner', owner, 'fid_n', fid_n,
          'window', window, 'claimed_at', int(now), 'lease_until', int(now + lease), unpack(fields))
        redis.call('ZADD', due, int(now + lease), member)
        for _, v in ipairs({member, window, attempt, flush_id, reason or '', items}) do
          table.insert(out, v)
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
  if again and out[1] ~= BACKLOG_DUE then out[1] = 0 end
  return out, found > limit
end
