-- head_problem.lua: nil when a base id's head is missing or sound, else what is wrong with it.
--- @include "head_state"

local function head_problem(head)
  local _, why = head_state(head)
  return why
end
