-- key_type.lua: the type of a key: 'none' when it does not exist.

local function key_type(key)
  return redis.call('TYPE', key)['ok']
end
