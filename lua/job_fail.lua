#!lua flags=allow-oom
-- allow-oom: a few fixed fields and a bounded error text; moves the job between indexes
-- job_fail.lua: a step (or on_complete) raised: count the failure and schedule a retry with
-- exponential backoff, or fail the job once the attempts are spent. Only the lease holder may
-- do this.
--
-- KEYS[1] job  pfx.."j:"..id
-- KEYS[2] guard pfx.."guard": never written, so no script of a migrating slot runs
-- ARGV[1] pfx
-- ARGV[2] job id
-- ARGV[3] owner           token from job_claim.lua
-- ARGV[4] error           error text to keep
-- ARGV[5] max_attempts    attempts of a step: the job fails at the max_attempts-th failure in a row
-- ARGV[6] backoff_ms      delay after failure n = min(backoff_max_ms, backoff_ms * 2^(n-1))
-- ARGV[7] backoff_max_ms
-- Derived keys: pfx.."due", pfx.."status:*".
-- Reply: {outcome, retries, delay_ms}; outcome 'retry', 'failed', 'lease_lost', 'corrupt' (its
-- keys hold something else: nothing written), or the status
-- ('paused', 'cancelled') when the job was stopped meanwhile (error kept, nothing scheduled)
--- @include "now_ms"
--- @include "int"
--- @include "job_problem"
--- @include "job_owned"
--- @include "job_end"

local job = KEYS[1]
local pfx, id, owner = ARGV[1], ARGV[2], ARGV[3]
if job_problem(ARGV[1], KEYS[1], ARGV[2]) then
  return {'corrupt', 0, 0}
end
if not job_owned(job, owner) then
  return {'lease_lost', 0, 0}
end
local now = now_ms()
local retries = redis.call('HINCRBY', job, 'retries', 1)
redis.call('HSET', job, 'error', ARGV[4], 'error_at', int(now), 'owner', '', 'updated_at', int(now))
redis.call('HDEL', job, 'lease_until')
local status = redis.call('HGET', job, 'status')
if status ~= 'running' then
  return {status, retries, 0}
end
if retries >= tonumber(ARGV[5]) then
  job_end(pfx, id, job, 'running', 'failed', now)
  return {'failed', retries, 0}
end
local delay = math.min(tonumber(ARGV[7]), tonumber(ARGV[6]) * (2 ^ math.min(retries - 1, 40)))
delay = math.floor(delay)
redis.call('HSET', job, 'next_run_at', int(now + delay))
redis.call('ZADD', pfx .. 'due', int(now + delay), id)
return {'retry', retries, delay}
