-- bad_ints.lua: nil when each named field of `key` is absent or a decimal integer, as the
-- scripts write them; else what is wrong with the first one that is not. The key must be a hash
-- (or missing).
--- @include "quote"
--- @include "is_int"

local function bad_ints(key, names)
  local v = redis.call('HMGET', key, unpack(names))
  for i, name in ipairs(names) do
    if not is_int(v[i]) then
      return key .. ' field ' .. name .. ' is ' .. quote(v[i]) .. ', not an integer'
    end
  end
  return nil
end
