-- partition_problem.lua: nil when a partition's own keys (due, ids, dead) are missing or of
-- their types, else what is wrong (a count of each, which fails on another type, is cheaper than
-- TYPE).
--- @include "wrong_type"

local function partition_problem(pfx)
  local due, ids, dead = pfx .. 'due', pfx .. 'ids', pfx .. 'dead'
  if type(redis.pcall('ZCARD', due)) == 'table' or type(redis.pcall('SCARD', ids)) == 'table'
      or type(redis.pcall('ZCARD', dead)) == 'table' then
    return wrong_type({due, 'zset', ids, 'set', dead, 'zset'})
  end
  return nil
end
