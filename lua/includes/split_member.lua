-- split_member.lua: the base id and sequence number (strings) a delay-queue member names; nil,
-- nil when it names none (an empty base id, a number of more than 15 digits).

local function split_member(member)
  local base, seq = string.match(member, '^(.*)::(%d+)$')
  if base == '' or (seq and #seq > 15) then return nil, nil end
  return base, seq
end
