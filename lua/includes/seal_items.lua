-- seal_items.lua: the items of a base id's accumulating sequence become the sealed sequence's
-- list: the open list is renamed (O(1), whatever its length) and its header dropped; they now
-- count as pending (the head's and the partition's). count: the open list's items for seq (open_items_of). Should the
-- sequence's own list hold items already -- added by a version of this library from before the
-- open list, straight to that list and counted as pending -- the open list's items are moved
-- after them one by one instead, never renamed over them. Returns the sealed list's length.
--- @include "member_of"
--- @include "pending_delta"

local function seal_items(pfx, head, base, seq, count)
  local ikey = pfx .. 'i:' .. member_of(base, seq)
  if count > 0 then
    local okey = pfx .. 'o:' .. base
    if redis.call('EXISTS', ikey) == 0 then
      redis.call('RENAME', okey, ikey)
      redis.call('LPOP', ikey)
      pending_delta(pfx, head, count)
      return count
    end
    redis.call('LPOP', okey)
    for _ = 1, count do
      redis.call('LMOVE', okey, ikey, 'LEFT', 'RIGHT')
    end
    pending_delta(pfx, head, count)
  end
  return redis.call('LLEN', ikey)
end
