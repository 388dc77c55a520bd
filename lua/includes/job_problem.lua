-- job_problem.lua: nil when a job's keys (and its iterator's) are missing or sound, else what
-- is wrong with them: checked before a job script writes anything.
--- @include "quote"
--- @include "wrong_type"
--- @include "bad_ints"

-- A job is runnable while its status is pending or running.
local JOB_STATUSES = {'pending', 'running', 'paused', 'completed', 'failed', 'cancelled'}

local function job_problem(pfx, job, id)
  local checks = {job, 'hash', pfx .. 'due', 'zset', pfx .. 'r:' .. id, 'list'}
  for _, s in ipairs(JOB_STATUSES) do
    table.insert(checks, pfx .. 'status:' .. s)
    table.insert(checks, 'zset')
  end
  local why = wrong_type(checks) or bad_ints(job, {'processed', 'retries', 'lease_until', 'created_at'})
  if why then return why end
  local status = redis.call('HGET', job, 'status')
  for _, s in ipairs(JOB_STATUSES) do
    if status == s then return nil end
  end
  if status then return job .. ' field status is ' .. quote(status) end
  return nil
end
