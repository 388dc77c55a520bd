-- member_of.lua: a sequence's delay-queue member "<base>::<N>", from its base id and number.

local function member_of(base, seq)
  return base .. '::' .. seq
end
