-- parse_header.lua: the sequence number and max_batch_size an open-list header names (max
-- nil: a header from before it carried one); nil when it is not a header.

local function parse_header(header)
  local seq, max = string.match(header, '^(%d+):%d+/?(%d*)$')
  if not seq or #seq > 15 or #max > 15 then return nil, nil end
  return seq, tonumber(max)
end
