-- lowest_active.lua: the lowest active sequence number of a base id (nil when none); used by
-- ordered processors.

local function lowest_active(head)
  local fields = redis.call('HKEYS', head)
  local low = nil
  for _, f in ipairs(fields) do
    local n = string.match(f, '^a:(%d+)$')
    if n then
      n = tonumber(n)
      if low == nil or n < low then low = n end
    end
  end
  return low
end
