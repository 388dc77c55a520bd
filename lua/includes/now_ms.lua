-- now_ms.lua: the server's time in ms, and the microseconds past that ms (a flush_id's
-- time is ms * 1000 + us).

local function now_ms()
  local t = redis.call('TIME')
  local us = tonumber(t[2])
  return tonumber(t[1]) * 1000 + math.floor(us / 1000), us % 1000
end
