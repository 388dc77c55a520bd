#!lua flags=allow-oom
-- allow-oom: one capped history entry and a few fields; failed items are moved, never copied
-- nack.lua: a delivery did not (fully) succeed -- keep what must be retried, never drop items.
--
-- KEYS[1] due      pfx.."due"
-- KEYS[2] history  pfx.."h:"..base
-- KEYS[3] guard    pfx.."guard": never written, so no script of a migrating slot runs
-- ARGV[1] pfx
-- ARGV[2] member          "base::N"
-- ARGV[3] owner           token from claim.lua; a worker that lost its lease is refused
-- ARGV[4] entry           history record (JSON)
-- ARGV[5] cap             history length limit
-- ARGV[6] delay_ms        backoff before the next attempt
-- ARGV[7] error           error text kept on the sequence (and on a dead letter)
-- ARGV[8] mode            'fail'    the handler raised (or timed out)
--                         'partial' only the marked items failed; the others count as
--                                   delivered
--                         'decode'  the marked entries cannot be decoded: they go to the
--                                   dead-letter store and the rest is redelivered at once
--                         'missing' fewer items were read than the window holds (evicted?):
--                                   due now, no try spent, for the claim to find out
-- ARGV[9] max_attempts    items failing this many times (bisection steps not counted) go to
--                         the dead-letter store
-- ARGV[10] bisect         '1': a failing window of several items is halved and retried at once
-- ARGV[11] retention      seconds to keep head/history once the base id has no active sequence
-- ARGV[12] max_batch_size largest delivery window of a sequence that did not record its own
-- ARGV[13] ordered        '1' for ordered processors
-- ARGV[14] dead_ttl_ms    dead letters are kept this long (0 = for ever)
-- ARGV[15] dead_max       at most this many dead letters per partition (0 = no limit)
-- ARGV[16] marks          'partial', 'decode': a bitmap over the delivered window, bit i (LSB
--                         first in each byte) set for item i
-- Derived keys: head, state and items of the sequence; dead-letter keys.
-- Reply: {outcome, detail}
--   'lease_lost' 0            nothing changed
--   'corrupt'    what         the keys hold something else; nothing changed
--   'retry'      next_at_ms   items kept, due again after the backoff
--   'bisect'     window       the next delivery (now) holds the first `window` items
--   'dead'       left         the window went to the dead-letter store; `left` items continue
--   'quarantined' left        undecodable entries moved out; `left` items redelivered now
--   'delivered'  left         a partial failure that named no item: all were delivered
--   'moving'     items        a window too large to rearrange in one call: the sequence is due
--                             now and the claims that find it go on with it (a move job,
--                             move_step.lua), then do what the outcome above would have done
--- @include "constants"
--- @include "now_ms"
--- @include "int"
--- @include "split_member"
--- @include "head_problem"
--- @include "seq_state"
--- @include "partition_problem"
--- @include "push_history"
--- @include "move_start"
--- @include "bury_window"

local due, hist = KEYS[1], KEYS[2]
local pfx, member, owner = ARGV[1], ARGV[2], ARGV[3]
local cap, delay, err, mode = tonumber(ARGV[5]), tonumber(ARGV[6]), ARGV[7], ARGV[8]
local max_attempts, bisect = tonumber(ARGV[9]), ARGV[10] == '1'
local cfg = {retention = tonumber(ARGV[11]), max = tonumber(ARGV[12]), ordered = ARGV[13] == '1'}
local dead = {ttl = tonumber(ARGV[14]), max = tonumber(ARGV[15])}
local marks = ARGV[16]
local meta = pfx .. 's:' .. member
local base, seq = split_member(member)
-- the state read once, checked before anything is written
local why = partition_problem(pfx)
local f, held = {}, 0
if not why and base then f, held, why = seq_state(pfx, member) end
if not why and base then why = head_problem(pfx .. 'b:' .. base) end
if why then
  return {'corrupt', why}
end
if not base or f.owner ~= owner or f.status ~= 'flushing' or not f.cutoff then
  return {'lease_lost', 0}
end
local now = now_ms()
local cutoff = tonumber(f.cutoff)
local window = math.min(tonumber(f.window or cutoff), cutoff)
local tries = tonumber(f.tries or '0')
local info = {tries = tries, deaths = tonumber(f.deaths or '0'), flush_id = f.flush_id, created_at = f.created_at}
local dead_id = (info.flush_id or int(now)) .. '.' .. cutoff
push_history(hist, ARGV[4], cap)

if mode == 'missing' then
  -- fewer items were read than the window holds: not delivered (the attempt does not count);
  -- due now, for the next claim to dead-letter what is left as items_missing
  redis.call('HSET', meta, 'owner', '', 'attempt', math.max(tonumber(f.attempt or '1') - 1, 0),
    'last_error', err, 'updated_at', int(now))
  redis.call('HDEL', meta, 'lease_until')
  redis.call('ZADD', due, int(now), member)
  return {'retry', now}
end

if mode == 'decode' then
  -- not the handler's fault: no try is spent
  return {move_start(pfx, member, {mv = 'XK', w = window, marks = marks, dead = (f.flush_id or int(now)) .. '.q'
    .. cutoff, finish = 'advance', err = err, reason = 'decode_error'}, now, cfg, dead, MOVE_BUDGET)}
end

if mode ~= 'partial' and bisect and window > 1 then
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
if mode == 'partial' then
  -- the marked items failed: they stay at the head and keep their flush_id (retried), or go to
  -- the dead-letter store once out of tries; the others were delivered
  local job = {mv = 'KD', w = window, marks = marks, finish = 'retry', at = now + delay, err = err}
  if tries >= max_attempts then
    job = {mv = 'XD', w = window, marks = marks, dead = dead_id, finish = 'advance', err = err,
      reason = 'max_attempts'}
  end
  return {move_start(pfx, member, job, now, cfg, dead, MOVE_BUDGET)}
end

if tries >= max_attempts then
  return {bury_window(pfx, dead_id, member, window, 'max_attempts', err, info, now, cfg, dead, MOVE_BUDGET)}
end

local at = now + delay
redis.call('HSET', meta, 'owner', '', 'last_error', err, 'next_attempt_at', int(at),
  'updated_at', int(now))
redis.call('HDEL', meta, 'lease_until')
redis.call('ZADD', due, int(at), member)
return {'retry', at}
