-- job_set_status.lua: move a job from one status index to another and record the new
-- status.
--- @include "int"

local function job_set_status(pfx, id, job, old, new, now)
  if old then
    redis.call('ZREM', pfx .. 'status:' .. old, id)
  end
  local created = redis.call('HGET', job, 'created_at') or int(now)
  redis.call('ZADD', pfx .. 'status:' .. new, created, id)
  redis.call('HSET', job, 'status', new, 'updated_at', int(now))
end
