-- flush.lua: manual flush -- seal a base id's accumulating sequence so workers take it now,
-- and make its sequences that wait for a retry due now too (a manual retry, as retry.lua).
--
-- KEYS[1] head  pfx.."b:"..base
-- KEYS[2] due   pfx.."due"
-- KEYS[3] guard pfx.."guard": never written, so no script of a migrating slot runs
-- ARGV[1] pfx
-- ARGV[2] base
-- ARGV[3] seq      sequence number to flush, or '' for the current accumulating one and every
--                  sequence waiting for a retry
-- Derived keys: pfx.."o:"..base (renamed to the sequence's pfx.."i:"..base.."::"..seq), the
-- pfx.."s:" state of each sequence looked at; wakes a worker: sets the wake-up token
-- pfx.."woke", publishes on the channel pfx.."wake".
-- Reply: {code, seq, count, status, retried...}
--   code 'ok'               sealed seq; count items are due now (its own and the retried ones')
--        'retried'          nothing sealed; the sequences `retried...` waited for a retry and
--                           are due now (seq: the first of them), holding count items
--        'empty'            nothing is accumulating (seq -1) or the sequence holds no items,
--                           and nothing waits for a retry
--        'not_found'        unknown base id or sequence
--        'not_accumulating' the named sequence is in `status` and does not wait for a retry
--        'corrupt'          the keys hold something else (status: what); nothing written
--   retried: the sequences made due by the retry, ascending (see waiting_retries.lua): their
--   attempt counts are kept. Named as base::N, a flushing sequence is only retried.
-- A damaged open-list header is rewritten: its items are sealed with the sequence.
--- @include "now_ms"
--- @include "member_of"
--- @include "wrong_type"
--- @include "head_problem"
--- @include "seq_problem"
--- @include "open_header"
--- @include "open_items_of"
--- @include "seal"
--- @include "waiting_retries"
--- @include "retry_now"
--- @include "wake_always"
--- @include "gone_sequence"

local head, due = KEYS[1], KEYS[2]
local pfx, base, want = ARGV[1], ARGV[2], ARGV[3]
local okey = pfx .. 'o:' .. base
local why = head_problem(head) or wrong_type({due, 'zset', okey, 'list'})
if why then
  return {'corrupt', -1, 0, why}
end
if redis.call('EXISTS', head) == 0 then
  return {'not_found', -1, 0, ''}
end
local now, sub = now_ms()
local seq
local waiting = {}
if want ~= '' then
  seq = want
  why = seq_problem(pfx, member_of(base, seq))
  if why then
    return {'corrupt', -1, 0, why}
  end
  local status = redis.call('HGET', pfx .. 's:' .. member_of(base, seq), 'status')
  if not status then
    if gone_sequence(head, seq) then
      return {'not_accumulating', tonumber(seq), 0, 'completed'}
    end
    return {'not_found', tonumber(seq), 0, ''}
  end
  if status ~= 'accumulating' then
    waiting, why = waiting_retries(pfx, due, head, base, {tonumber(seq)}, now)
    if why then
      return {'corrupt', -1, 0, why}
    end
    if #waiting == 0 then
      return {'not_accumulating', tonumber(seq), 0, status}
    end
    seq = nil
  end
else
  -- the seed's failed flush accumulates again, so its flush(id) retried it with the new items:
  -- here the sequences waiting for a retry are made due with the seal
  waiting, why = waiting_retries(pfx, due, head, base, nil, now)
  if why then
    return {'corrupt', -1, 0, why}
  end
  seq = redis.call('HGET', head, 'acc')
  why = seq and seq_problem(pfx, member_of(base, seq))
  if why then
    return {'corrupt', -1, 0, why}
  end
end
local count, sealed = 0, false
if seq then
  -- the accumulating sequence's items are in the base id's open list, behind its header (and
  -- in its own list, if a version from before the open list added some: see seal_items)
  local open, _, how = open_items_of(pfx, base, seq, redis.call('HGET', head, 'acc'))
  if open > 0 or redis.call('LLEN', pfx .. 'i:' .. member_of(base, seq)) > 0 then
    if how == 'damaged' then
      local smax = redis.call('HGET', pfx .. 's:' .. member_of(base, seq), 'max') or '0'
      redis.call('LSET', okey, 0, open_header(seq, now, smax))
    end
    count = seal(pfx, head, due, base, seq, open, 'manual', now, sub)
    sealed = true
  end
end
if not sealed and #waiting == 0 then
  return {'empty', seq and tonumber(seq) or -1, 0, seq and 'accumulating' or ''}
end
local retried, more = retry_now(pfx, due, base, waiting, now)
wake_always(pfx)
local reply = {sealed and 'ok' or 'retried', sealed and tonumber(seq) or retried[1], count + more, 'flushing'}
for _, r in ipairs(retried) do table.insert(reply, r) end
return reply
