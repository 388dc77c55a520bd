-- _jobs.lua: helpers prepended (after _common.lua) to the iterator-job scripts (job_*.lua).
--
-- Key layout (pfx = "<prefix>:{jobs:<iterator>}:", one hash tag per iterator):
--   pfx.."due"            ZSET  runnable job ids, score = when runnable / lease expiry (ms)
--   pfx.."j:"..id         HASH  job state: status, cursor, processed, retries, error, owner, ...
--   pfx.."r:"..id         LIST  progress samples "<ms>:<processed>", newest first, one per second
--   pfx.."status:"..s     ZSET  job ids in status s, score = created_at (listing by status)
-- A job is runnable while its status is pending or running. The worker that claimed it is
-- `owner` (a random token, the fencing token): every write of a step presents it.

local JOB_SAMPLES = 64
local JOB_STATUSES = {'pending', 'running', 'paused', 'completed', 'failed', 'cancelled'}

-- nil when a job's keys (and its iterator's) are missing or sound, else what is wrong with them:
-- checked before a job script writes anything.
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

-- Move a job from one status index to another and record the new status.
local function job_set_status(pfx, id, job, old, new, now)
  if old then
    redis.call('ZREM', pfx .. 'status:' .. old, id)
  end
  local created = redis.call('HGET', job, 'created_at') or int(now)
  redis.call('ZADD', pfx .. 'status:' .. new, created, id)
  redis.call('HSET', job, 'status', new, 'updated_at', int(now))
end

-- True when `owner` (a non-empty lease token) holds the job: every write of a step checks it.
local function job_owned(job, owner)
  return owner ~= '' and redis.call('HGET', job, 'owner') == owner
end

-- A job reached a final status (completed, failed, cancelled): indexed, timed, not runnable.
local function job_end(pfx, id, job, old, new, now)
  job_set_status(pfx, id, job, old, new, now)
  redis.call('HSET', job, 'finished_at', int(now))
  redis.call('ZREM', pfx .. 'due', id)
end

-- Record a progress sample, at most one per second (the first of each second is kept).
local function job_sample(pfx, id, processed, now)
  local key = pfx .. 'r:' .. id
  local head = redis.call('LINDEX', key, 0)
  if head then
    local t = tonumber(string.match(head, '^(%d+):'))
    if t and math.floor(t / 1000) == math.floor(now / 1000) then
      return
    end
  end
  redis.call('LPUSH', key, int(now) .. ':' .. int(processed))
  redis.call('LTRIM', key, 0, JOB_SAMPLES - 1)
end
