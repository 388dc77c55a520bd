-- status.lua: one consistent snapshot of a base id -- head record plus every active sequence.
--
-- KEYS[1] head  pfx.."b:"..base
-- KEYS[2] due   pfx.."due"
-- KEYS[3] guard pfx.."guard": never written, so no script of a migrating slot runs
-- ARGV[1] pfx
-- ARGV[2] base
-- Derived keys: state and items of each active sequence (the open list pfx.."o:"..base for the
-- accumulating one).
-- Reply: {head_fields, now, {seq, state_fields, llen, added_at, due_at}, ...}
--   head_fields   flat HGETALL of the head ({} when the base id is unknown)
--   now           the server's time (ms): what due_at is compared with (overdue)
--   per active sequence (accumulating or flushing): its number, flat HGETALL, item count, for
--   the accumulating sequence the time of its last add (ms; '' for the others), and its score
--   in the delay queue (ms: when it is due, or its lease runs out; '' when it has no entry)
-- or {'corrupt', what} when the keys hold something else
--- @include "now_ms"
--- @include "member_of"
--- @include "wrong_type"
--- @include "head_problem"
--- @include "seq_problem"
--- @include "open_items_of"

local head = KEYS[1]
local pfx, base = ARGV[1], ARGV[2]
local why = head_problem(head) or wrong_type({pfx .. 'o:' .. base, 'list', KEYS[2], 'zset'})
if why then
  return {'corrupt', why}
end
local fields = redis.call('HGETALL', head)
local now = now_ms()  -- its first value only: the ms
local out = {fields, now}
local acc = nil
for i = 1, #fields, 2 do
  if fields[i] == 'acc' then acc = fields[i + 1] end
end
for i = 1, #fields, 2 do
  local seq = string.match(fields[i], '^a:(%d+)$')
  if seq then
    local member = member_of(base, seq)
    why = seq_problem(pfx, member)
    if why then
      return {'corrupt', why}
    end
    local llen, added = 0, ''
    llen = redis.call('LLEN', pfx .. 'i:' .. member)
    if seq == acc then
      -- plus its open list's items (its own list holds any only if a version from before the
      -- open list added them: see seal_items)
      local open, okey, how = open_items_of(pfx, base, seq, acc)
      llen = llen + open
      if how == 'own' then
        added = string.match(redis.call('LINDEX', okey, 0), '^%d+:(%d+)') or ''
      end
    end
    local due_at = redis.call('ZSCORE', KEYS[2], member) or ''
    table.insert(out, {tonumber(seq), redis.call('HGETALL', pfx .. 's:' .. member), llen, added, due_at})
  end
end
return out
