#!lua flags=allow-oom
-- allow-oom: one capped history entry and a few fields; failed items are moved, never copied
-- nack.lua: a delivery did not (fully) succeed -- keep what must be retried, never drop items.
--
-- KEYS[1] due      pfx.."due"
-- KEYS[2] history  pfx.."h:"..base
-- ARGV[1] pfx
-- ARGV[2] member          "base::N"
-- ARGV[3] owner           token from claim.lua; a worker that lost its lease is refused
-- ARGV[4] entry           history record (JSON)
-- ARGV[5] cap             history length limit
-- ARGV[6] delay_ms        backoff before the next attempt
-- ARGV[7] error           error text kept on the sequence (and on a dead letter)
-- ARGV[8] mode            'fail'    the handler raised (or timed out)
--                         'partial' only the items at the given indices failed; the others
--                                   count as delivered
--                         'decode'  the entries at the given indices cannot be decoded: they go
--                                   to the dead-letter store and the rest is redelivered at once
-- ARGV[9] max_attempts    items failing this many times (bisection steps not counted) go to
--                         the dead-letter store
-- ARGV[10] bisect         '1': a failing window of several items is halved and retried at once
-- ARGV[11] retention      seconds to keep head/history once the base id has no active sequence
-- ARGV[12] max_batch_size largest delivery window
-- ARGV[13] ordered        '1' for ordered processors
-- ARGV[14..] indices      0-based positions in the delivered window ('partial', 'decode')
-- Derived keys: head, state and items of the sequence; dead-letter keys.
-- Reply: {outcome, detail}
--   'lease_lost' 0            nothing changed
--   'retry'      next_at_ms   items kept, due again after the backoff
--   'bisect'     window       the next delivery (now) holds the first `window` items
--   'dead'       left         the window went to the dead-letter store; `left` items continue
--   'quarantined' left        undecodable entries moved out; `left` items redelivered now
--   'delivered'  left         a partial failure that named no item: all were delivered
local due, hist = KEYS[1], KEYS[2]
local pfx, member, owner = ARGV[1], ARGV[2], ARGV[3]
local cap, delay, err, mode = tonumber(ARGV[5]), tonumber(ARGV[6]), ARGV[7], ARGV[8]
local max_attempts, bisect = tonumber(ARGV[9]), ARGV[10] == '1'
local cfg = {retention = tonumber(ARGV[11]), max = tonumber(ARGV[12]), ordered = ARGV[13] == '1'}
local meta = pfx .. 's:' .. member
local ikey = pfx .. 'i:' .. member
local f = redis.call('HMGET', meta, 'owner', 'status', 'window', 'cutoff', 'attempt', 'deaths',
  'flush_id', 'created_at', 'fid_n', 'tries')
if f[1] ~= owner or f[2] ~= 'flushing' then
  return {'lease_lost', 0}
end
local now = now_ms()
local base, seq = split_member(member)
local cutoff = tonumber(f[4])
local window = math.min(tonumber(f[3] or cutoff), cutoff)
local tries = tonumber(f[10] or '0')
local info = {tries = tries, deaths = tonumber(f[6] or '0'), flush_id = f[7], created_at = f[8]}
push_history(hist, ARGV[4], cap)

local marked = {}
for i = 14, #ARGV do marked[tonumber(ARGV[i]) + 1] = true end

if mode == 'decode' then
  local items = pop_head(ikey, window)
  local keep, bad = {}, {}
  for i, it in ipairs(items) do
    if marked[i] then table.insert(bad, it) else table.insert(keep, it) end
  end
  push_head(ikey, keep)
  if #bad > 0 then
    bury(pfx, (f[7] or int(now)) .. '.q' .. cutoff, member, bad, #bad, 'decode_error', err, info, now)
  end
  -- not the handler's fault: no try is spent
  return {'quarantined', advance(pfx, base, seq, #bad, now, cfg)}
end

if mode == 'partial' then
  local items = pop_head(ikey, window)
  local keep = {}
  for i, it in ipairs(items) do
    if marked[i] then table.insert(keep, it) end
  end
  push_head(ikey, keep)
  local delivered = window - #keep
  local head = pfx .. 'b:' .. base
  if redis.call('HINCRBY', head, 'pending', int(-delivered)) < 0 then redis.call('HSET', head, 'pending', 0) end
  redis.call('HINCRBY', meta, 'delivered', delivered)
  cutoff = cutoff - delivered
  window = #keep
  -- the failed items stay at the head and keep their flush_id
  redis.call('HSET', meta, 'cutoff', cutoff, 'window', window,
    'fid_n', math.max(tonumber(f[9] or '0') - delivered, window))
  if window == 0 then
    return {'delivered', advance(pfx, base, seq, 0, now, cfg)}
  end
elseif bisect and window > 1 then
  -- isolate the poison: deliver the first half on its own, now, without spending an attempt
  -- (the flush_id stays: these items were delivered under it)
  window = math.ceil(window / 2)
  redis.call('HSET', meta, 'window', window, 'owner', '', 'last_error', err, 'updated_at', int(now))
  redis.call('HDEL', meta, 'lease_until')
  redis.call('ZADD', due, int(now), member)
  return {'bisect', window}
end

tries = tries + 1
info.tries = tries
redis.call('HSET', meta, 'tries', tries)
if tries >= max_attempts then
  local items = nil
  if window < redis.call('LLEN', ikey) then items = pop_head(ikey, window) end
  bury(pfx, (info.flush_id or int(now)) .. '.' .. cutoff, member, items, window, 'max_attempts', err, info, now)
  return {'dead', advance(pfx, base, seq, window, now, cfg)}
end

local at = now + delay
redis.call('HSET', meta, 'owner', '', 'last_error', err, 'next_attempt_at', int(at),
  'updated_at', int(now))
redis.call('HDEL', meta, 'lease_until')
redis.call('ZADD', due, int(at), member)
return {'retry', at}
