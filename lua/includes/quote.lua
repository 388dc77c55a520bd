-- quote.lua: a value read from Redis, for an error message: quoted, at most 40 bytes.

local function quote(v)
  if not v then return 'nil' end
  if #v > 40 then v = string.sub(v, 1, 40) .. '...' end
  return string.format('%q', v)
end
