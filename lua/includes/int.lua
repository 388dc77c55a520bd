-- int.lua: a number as a decimal integer string (never an exponent), for keys, fields and
-- replies.

local function int(n)
  return string.format('%d', n)
end
