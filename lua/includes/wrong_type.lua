-- wrong_type.lua: nil when each key is missing or of its type; else what is wrong with the
-- first one that is not. checks: {key, type, key, type, ...}

local function wrong_type(checks)
  for i = 1, #checks, 2 do
    local t = redis.call('TYPE', checks[i])['ok']
    if t ~= 'none' and t ~= checks[i + 1] then
      return checks[i] .. ' is a ' .. t .. ', not a ' .. checks[i + 1]
    end
  end
  return nil
end
