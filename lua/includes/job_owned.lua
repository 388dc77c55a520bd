-- job_owned.lua: true when `owner` (a non-empty lease token) holds the job. The worker that
-- claimed a job is its `owner` (a random token, the fencing token): every write of a step
-- presents it, and is checked here.

local function job_owned(job, owner)
  return owner ~= '' and redis.call('HGET', job, 'owner') == owner
end
