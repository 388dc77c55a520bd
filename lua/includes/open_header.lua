-- open_header.lua: the header entry of a base id's open list (index 0): the accumulating
-- sequence's number, the time of its last add (ms, 13 digits: the entry keeps its size when LSET
-- rewrites it) and the max_batch_size it was opened with (a producer configured otherwise still
-- seals it there).
--- @include "int"

local function open_header(seq, now, max)
  return seq .. ':' .. int(now) .. '/' .. max
end
