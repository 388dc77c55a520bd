-- flush.lua: manual flush -- seal a base id's accumulating sequence so workers take it now.
--
-- KEYS[1] head  pfx.."b:"..base
-- KEYS[2] due   pfx.."due"
-- KEYS[3] guard pfx.."guard": never written, so no script of a migrating slot runs
-- ARGV[1] pfx
-- ARGV[2] base
-- ARGV[3] seq      sequence number to flush, or '' for the current accumulating one
-- Derived keys: pfx.."o:"..base (renamed to the sequence's pfx.."i:"..base.."::"..seq), its
-- pfx.."s:" state; wakes a worker: sets the wake-up token pfx.."woke", publishes on the
-- channel pfx.."wake".
-- Reply: {code, seq, count, status}
--   code 'ok'               sealed; count items will be delivered
--        'empty'            nothing is accumulating (seq -1) or the sequence holds no items
--        'not_found'        unknown base id or sequence
--        'not_accumulating' the sequence exists but is in `status`
--        'corrupt'          the keys hold something else (status: what); nothing written
-- A damaged open-list header is rewritten: its items are sealed with the sequence.
--- @include "now_ms"
--- @include "member_of"
--- @include "wrong_type"
--- @include "head_problem"
--- @include "seq_problem"
--- @include "open_header"
--- @include "open_items_of"
--- @include "seal"
--- @include "wake_always"

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
local seq
if want ~= '' then
  seq = want
  why = seq_problem(pfx, member_of(base, seq))
  if why then
    return {'corrupt', -1, 0, why}
  end
  local status = redis.call('HGET', pfx .. 's:' .. member_of(base, seq), 'status')
  if not status then
    local nxt = tonumber(redis.call('HGET', head, 'next') or '0')
    if tonumber(seq) < nxt then
      return {'not_accumulating', tonumber(seq), 0, 'completed'}
    end
    return {'not_found', tonumber(seq), 0, ''}
  end
  if status ~= 'accumulating' then
    return {'not_accumulating', tonumber(seq), 0, status}
  end
else
  seq = redis.call('HGET', head, 'acc')
  if not seq then
    return {'empty', -1, 0, ''}
  end
  why = seq_problem(pfx, member_of(base, seq))
  if why then
    return {'corrupt', -1, 0, why}
  end
end
-- the accumulating sequence's items are in the base id's open list, behind its header (and
-- in its own list, if a version from before the open list added some: see seal_items)
local open, _, how = open_items_of(pfx, base, seq, redis.call('HGET', head, 'acc'))
if open == 0 and redis.call('LLEN', pfx .. 'i:' .. member_of(base, seq)) == 0 then
  return {'empty', tonumber(seq), 0, 'accumulating'}
end
local now, sub = now_ms()
if how == 'damaged' then
  local smax = redis.call('HGET', pfx .. 's:' .. member_of(base, seq), 'max') or '0'
  redis.call('LSET', okey, 0, open_header(seq, now, smax))
end
local count = seal(pfx, head, due, base, seq, open, 'manual', now, sub)
wake_always(pfx)
return {'ok', tonumber(seq), count, 'flushing'}
