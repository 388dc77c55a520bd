-- read_member.lua: why a due member cannot be delivered as it is (nil when it can): what
-- claim_due reads of it must be what the scripts write. Returns the member's state fields, its
-- list's length and its head's fields (seq_state, head_state), all read before anything is
-- written; or nil and what is wrong.
--- @include "split_member"
--- @include "quote"
--- @include "wrong_type"
--- @include "head_state"
--- @include "seq_state"

local function read_member(pfx, member)
  local base = split_member(member)
  if not base then
    return nil, nil, nil, 'the delay-queue member ' .. quote(member) .. ' names no sequence (<batch id>::<N>)'
  end
  local f, llen, why = seq_state(pfx, member)
  if why then return nil, nil, nil, why end
  if not f.status then
    return nil, nil, nil, 'the delay queue names ' .. member .. ', which has no state (' .. pfx .. 's:'
      .. member .. ')'
  end
  local h
  h, why = head_state(pfx .. 'b:' .. base)
  if not why and f.status == 'accumulating' then
    why = wrong_type({pfx .. 'o:' .. base, 'list'})
  end
  if why then return nil, nil, nil, why end
  return f, llen, h, nil
end
