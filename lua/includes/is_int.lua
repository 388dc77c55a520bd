-- is_int.lua: whether a value is one the scripts wrote as a decimal integer (nil: absent,
-- fine).

local function is_int(v)
  return not v or (string.match(v, '^%-?%d+$') ~= nil and #v <= 17)
end
