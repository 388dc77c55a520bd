-- seq_problem.lua: nil when a sequence's state and items are missing or sound, else what is
-- wrong with them.
--- @include "seq_state"

local function seq_problem(pfx, member)
  local _, _, why = seq_state(pfx, member)
  return why
end
