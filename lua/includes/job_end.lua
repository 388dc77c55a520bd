-- job_end.lua: a job reached a final status (completed, failed, cancelled): indexed, timed,
-- not runnable.
--- @include "int"
--- @include "job_set_status"

local function job_end(pfx, id, job, old, new, now)
  job_set_status(pfx, id, job, old, new, now)
  redis.call('HSET', job, 'finished_at', int(now))
  redis.call('ZREM', pfx .. 'due', id)
end
