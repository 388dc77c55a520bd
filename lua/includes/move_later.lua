-- move_later.lua: persist an unfinished move job's progress; the sequence stays due now,
-- without an owner, so the next claim of any worker goes on with it.
--- @include "int"

local function move_later(pfx, member, j, now)
  redis.call('HSET', pfx .. 's:' .. member, 'mv_done', j.done, 'mv_keep', j.keep, 'mv_rot', j.rot,
    'mv_out', j.out, 'owner', '', 'updated_at', int(now))
  redis.call('HDEL', pfx .. 's:' .. member, 'lease_until')
  redis.call('ZADD', pfx .. 'due', int(now), member)
end
