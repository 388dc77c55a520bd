-- bury_list.lua: move a sequence's whole list into a new dead letter (RENAME: O(1) whatever
-- its length). Returns the dead letter's id.
--- @include "split_member"
--- @include "fresh_dead_id"
--- @include "register_dead"

local function bury_list(pfx, id, member, count, reason, err, f, now, dead)
  local base, seq = split_member(member)
  id = fresh_dead_id(pfx, id)
  if count > 0 then
    redis.call('RENAME', pfx .. 'i:' .. member, pfx .. 'di:' .. id)
  end
  register_dead(pfx, id, base, seq, count, reason, err, f, now, dead)
  return id
end
