-- idle_due.lua: the due time of a sequence opened with flush_idle after an add at `now`: idle
-- ms later, but never past `cap`, the deadline its flush_interval set when it was opened (0:
-- none). Each add moves the entry later, up to cap, so it stays where it is once cap is near.
--- @include "int"

local function idle_due(now, idle, cap)
  local at = now + idle
  if cap > 0 and at > cap then
    at = cap
  end
  return int(at)
end
