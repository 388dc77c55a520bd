-- parse_header.lua: the sequence number, max_batch_size and flush_idle cap an open-list header
-- names (max nil: a header from before it carried one; cap nil: a sequence opened without
-- flush_idle, else the deadline its flush_interval set, 0 for none: see add.lua); nil when it is
-- not a header.

local function parse_header(header)
  local seq, max = string.match(header, '^(%d+):%d+/?(%d*)$')
  local cap = ''
  if not seq then
    seq, max, cap = string.match(header, '^(%d+):%d+/(%d+)/(%d+)$')
  end
  if not seq or #seq > 15 or #max > 15 or #cap > 15 then return nil, nil, nil end
  return seq, tonumber(max), tonumber(cap)
end
