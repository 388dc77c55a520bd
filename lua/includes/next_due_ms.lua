-- next_due_ms.lua: ms until the earliest entry of a delay queue is due (0 = due now); -1 when
-- it is empty.

local function next_due_ms(due, now)
  local first = redis.call('ZRANGE', due, 0, 0, 'WITHSCORES')
  if #first == 0 then
    return -1
  end
  return math.max(0, tonumber(first[2]) - now)
end
