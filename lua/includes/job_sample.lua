-- job_sample.lua: record a job's progress sample (pfx.."r:"..id), at most one per second (the
-- first of each second is kept), the newest JOB_SAMPLES of them.
--- @include "int"

local JOB_SAMPLES = 64

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
