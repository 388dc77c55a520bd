-- unpark.lua: ordered processors: a parked sequence becomes due when it is the lowest active
-- one again.
--- @include "int"
--- @include "member_of"
--- @include "key_type"
--- @include "lowest_active"

local function unpark(pfx, head, due, base, now)
  local low = lowest_active(head)
  if low then
    local member = member_of(base, low)
    local meta = pfx .. 's:' .. member
    if key_type(meta) == 'hash' and redis.call('HGET', meta, 'parked') == '1' then
      redis.call('HDEL', meta, 'parked')
      redis.call('ZADD', due, int(now), member)
    end
  end
end
