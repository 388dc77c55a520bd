-- add.lua: append items to a base id's accumulating sequence, sealing full sequences.
--
-- KEYS[1] head     pfx.."b:"..base
-- KEYS[2] ids      pfx.."ids"
-- KEYS[3] due      pfx.."due"
-- KEYS[4] history  pfx.."h:"..base
-- ARGV[1] pfx            "<prefix>:{<processor>:<partition>}:"
-- ARGV[2] base           base batch id
-- ARGV[3] max_batch_size a sequence is sealed when it holds this many items
-- ARGV[4] interval_ms    delay before an interval flush; -1 = no interval timer
-- ARGV[5] channel        pub/sub channel published to when a sequence is sealed or a new
--                        timer became the earliest entry of the delay queue
-- ARGV[6] max_pending    refuse an add when the base id would hold more undelivered items
--                        than this; -1 = no limit
-- ARGV[7] segments       '' (all items are one add) or "n1,n2,..": several adds coalesced into
--                        one call (group commit), each answered on its own
-- ARGV[8..] items        encoded items, in add order
-- Derived keys: pfx.."s:"..base.."::"..N and pfx.."i:"..base.."::"..N for the sequences touched.
-- Reply: five fields per add (segment), in order: {seq, pending, status, sealed, added}, or
-- {'full', undelivered, '', 0, 0} when that add would exceed max_pending (nothing of it written)
--   seq      sequence that received the last item
--   pending  items in that sequence after the add
--   status   'accumulating' or 'flushing' (the last item sealed it)
--   sealed   number of sequences this call sealed (0 .. n)
--   added    number of items appended
local head, ids, due, hist = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local pfx, base = ARGV[1], ARGV[2]
local max = tonumber(ARGV[3])
local interval = tonumber(ARGV[4])
local first, last = 8, #ARGV
local max_pending = tonumber(ARGV[6])
local now = now_ms()
local wake = false

local function open_sequence()
  local seq = redis.call('HINCRBY', head, 'next', 1) - 1
  local member = member_of(base, seq)
  redis.call('HSET', pfx .. 's:' .. member, 'status', 'accumulating',
    'created_at', int(now), 'updated_at', int(now), 'attempt', 0)
  redis.call('HSET', head, 'acc', seq, 'a:' .. seq, 'accumulating')
  if redis.call('HINCRBY', head, 'active', 1) == 1 then
    redis.call('SADD', ids, base)
    redis.call('PERSIST', head)
    redis.call('PERSIST', hist)
  end
  if interval >= 0 then
    redis.call('ZADD', due, int(now + interval), member)
    -- an idle worker sleeps until the earliest due entry: tell it when that changed
    if redis.call('ZRANGE', due, 0, 0)[1] == member then
      wake = true
    end
  end
  return seq
end

-- one segment per caller (group commit): each gets its own result and its own max_pending check
local segs = {}
if ARGV[7] == '' then
  segs[1] = last - first + 1
else
  for n in string.gmatch(ARGV[7], '%d+') do table.insert(segs, tonumber(n)) end
end

local state = redis.call('HMGET', head, 'acc', 'pending')
local pending = tonumber(state[2] or '0')
local accepted = 0
local any_sealed = false
local seq = state[1]   -- the accumulating sequence (nil: none yet)
local count = nil      -- its length, when known
if seq then seq = tonumber(seq) end
local out = {}
local i = first
for _, n in ipairs(segs) do
  local stop = i + n - 1
  if max_pending >= 0 and pending + n > max_pending then
    for _, v in ipairs({'full', pending, '', 0, 0}) do table.insert(out, v) end
  else
    pending = pending + n
    accepted = accepted + n
    local res_seq, res_count, status, sealed = seq, count, 'accumulating', 0
    while i <= stop do
      if not seq then
        seq = open_sequence()
        count = 0
      end
      local member = member_of(base, seq)
      local ikey = pfx .. 'i:' .. member
      if count == nil and i == stop then
        -- single item into an existing sequence: RPUSH tells the new length
        count = redis.call('RPUSH', ikey, ARGV[i])
        i = i + 1
      else
        if count == nil then count = redis.call('LLEN', ikey) end
        local take = math.max(math.min(max - count, stop - i + 1), 0)
        local j = i
        while j < i + take do
          local k = math.min(j + 4999, i + take - 1)
          redis.call('RPUSH', ikey, unpack(ARGV, j, k))
          j = k + 1
        end
        count = count + take
        i = i + take
      end
      redis.call('HSET', pfx .. 's:' .. member, 'updated_at', int(now))
      res_seq, res_count = seq, count
      if count >= max then
        seal(pfx, head, due, base, seq, count, 'size', now)
        sealed = sealed + 1
        status = 'flushing'
        seq, count = nil, nil
      else
        status = 'accumulating'
      end
    end
    if sealed > 0 then any_sealed = true end
    for _, v in ipairs({res_seq, res_count, status, sealed, n}) do table.insert(out, v) end
  end
  i = stop + 1
end
if accepted > 0 then
  redis.call('HINCRBY', head, 'pending', accepted)
end
if any_sealed or wake then
  redis.call('PUBLISH', ARGV[5], pfx)
end
return out
