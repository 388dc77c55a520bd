-- open_items_of.lua: the items of the base id's open list that belong to sequence `seq` (the
-- list minus its header), the list's key, and how they were found:
--   'own'      the header names seq
--   'damaged'  the header names nothing (or another sequence) but seq is the head's
--              accumulating one (acc): every entry after index 0 is still its item
--   'none'     no open list; 'other': the list is another sequence's, never touched for seq
-- The list must be a list or missing (checked by the caller).
--- @include "parse_header"

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
