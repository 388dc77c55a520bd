-- marked.lua: whether item `i` (from 0) of a window is marked in the bitmap `marks` (bit i,
-- LSB first in each byte; no bitmap: every item is marked).

local function marked(marks, i)
  if not marks then return true end
  local b = string.byte(marks, math.floor(i / 8) + 1)
  return b ~= nil and math.floor(b / 2 ^ (i % 8)) % 2 == 1
end
