-- push_history.lua: add an entry to a base id's flush history, keeping at most `cap`. History
-- is advisory: an entry is not written where the key holds something else.
--- @include "key_type"

local function push_history(hist, entry, cap)
  local t = key_type(hist)
  if t ~= 'list' and t ~= 'none' then return end
  if redis.call('LPUSH', hist, entry) > cap then
    redis.call('LTRIM', hist, 0, cap - 1)
  end
end
