-- prune_dead.lua: dead letters are kept for at most dead.ttl ms (0: for ever) and at most
-- dead.max of them per partition (0: no limit): each new one drops at most DEAD_PRUNE of the
-- oldest past either.
--- @include "int"

-- Dead letters dropped at most per new one, by age or number.
local DEAD_PRUNE = 100

local function prune_dead(pfx, dead, now)
  local zkey = pfx .. 'dead'
  local drop = {}
  if dead.ttl > 0 then
    drop = redis.call('ZRANGEBYSCORE', zkey, '-inf', int(now - dead.ttl), 'LIMIT', 0, DEAD_PRUNE)
  end
  if dead.max > 0 and #drop < DEAD_PRUNE then
    local over = redis.call('ZCARD', zkey) - #drop - dead.max
    if over > 0 then
      drop = redis.call('ZRANGE', zkey, 0, math.min(over + #drop, DEAD_PRUNE) - 1)
    end
  end
  for _, id in ipairs(drop) do
    redis.call('ZREM', zkey, id)
    redis.call('UNLINK', pfx .. 'd:' .. id, pfx .. 'di:' .. id)
  end
end
