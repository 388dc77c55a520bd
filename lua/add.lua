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
-- ARGV[6] max_pending    refuse the whole call when the base id would hold more undelivered
--                        items than this; -1 = no limit
-- ARGV[7..] items        encoded items, in add order
-- Derived keys: pfx.."s:"..base.."::"..N and pfx.."i:"..base.."::"..N for the sequences touched.
-- Reply: {seq, pending, status, sealed, added}, or {'full', undelivered} when max_pending
-- would be exceeded (nothing written)
--   seq      sequence that received the last item
--   pending  items in that sequence after the add
--   status   'accumulating' or 'flushing' (the last item sealed it)
--   sealed   number of sequences this call sealed (0 .. n)
--   added    number of items appended
local head, ids, due, hist = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local pfx, base = ARGV[1], ARGV[2]
local max = tonumber(ARGV[3])
local interval = tonumber(ARGV[4])
local first, last = 7, #ARGV
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

local state = redis.call('HMGET', head, 'acc', 'pending')
if max_pending >= 0 and tonumber(state[2] or '0') + (last - first + 1) > max_pending then
  return {'full', tonumber(state[2] or '0')}
end
redis.call('HINCRBY', head, 'pending', last - first + 1)
local seq = state[1]
local count = nil
if seq then seq = tonumber(seq) end
local status = 'accumulating'
local sealed = 0
local i = first
while i <= last do
  if not seq then
    seq = open_sequence()
    count = 0
  end
  local member = member_of(base, seq)
  local ikey = pfx .. 'i:' .. member
  if count == nil and i == last then
    -- single item into an existing sequence: RPUSH tells the new length
    count = redis.call('RPUSH', ikey, ARGV[i])
    i = i + 1
  else
    if count == nil then count = redis.call('LLEN', ikey) end
    local take = math.min(max - count, last - i + 1)
    local j = i
    while j < i + take do
      local k = math.min(j + 4999, i + take - 1)
      redis.call('RPUSH', ikey, unpack(ARGV, j, k))
      j = k + 1
    end
    count = count + math.max(take, 0)
    i = i + math.max(take, 0)
  end
  redis.call('HSET', pfx .. 's:' .. member, 'updated_at', int(now))
  if count >= max then
    seal(pfx, head, due, base, seq, count, 'size', now)
    sealed = sealed + 1
    status = 'flushing'
    if i <= last then
      seq = nil
      count = nil
    end
  else
    status = 'accumulating'
  end
end
if sealed > 0 or wake then
  redis.call('PUBLISH', ARGV[5], pfx)
end
return {seq, count, status, sealed, last - first + 1}
