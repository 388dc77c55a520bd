-- claim.lua: take due sequences from a partition's delay queue and lease them to a worker.
--
-- KEYS[1] due  pfx.."due"
-- ARGV[1] pfx
-- ARGV[2] limit       claim at most this many sequences
-- ARGV[3] lease_ms    lease length; the entry is re-scored to now + lease_ms, so a flush whose
--                     worker dies becomes due again when the lease runs out
-- ARGV[4] owner       random token of this claim; ack/nack/extend must present it
-- ARGV[5] id_seed     random string; first deliveries get flush_id = id_seed.."-"..i
-- ARGV[6] retention   seconds to keep head/history of a base id left without sequences
-- Derived keys: head, sequence state and items of each claimed member.
-- Reply: {next_due_ms, member, cutoff, attempt, flush_id, reason, ...}
--   next_due_ms  ms until the earliest remaining entry is due (0 = due now, -1 = queue empty)
--   then five fields per claimed sequence.
local due = KEYS[1]
local pfx = ARGV[1]
local limit = tonumber(ARGV[2])
local lease = tonumber(ARGV[3])
local owner, seed = ARGV[4], ARGV[5]
local retention = tonumber(ARGV[6])
local now = now_ms()
local out = {0}
local members = redis.call('ZRANGEBYSCORE', due, '-inf', int(now), 'LIMIT', 0, limit)
for n, member in ipairs(members) do
  local meta = pfx .. 's:' .. member
  local base, seq = split_member(member)
  local f = redis.call('HMGET', meta, 'status', 'cutoff', 'attempt', 'flush_id', 'reason')
  if (not base) or (not f[1]) then
    -- an entry whose sequence no longer exists: nothing to deliver
    redis.call('ZREM', due, member)
  else
    local head = pfx .. 'b:' .. base
    local ikey = pfx .. 'i:' .. member
    local cutoff = tonumber(f[2])
    local reason = f[5]
    if f[1] == 'accumulating' then
      -- interval timer fired: seal with the current length as the cutoff
      cutoff = redis.call('LLEN', ikey)
      if cutoff > 0 then
        seal(pfx, head, due, base, seq, cutoff, 'interval', now)
        reason = 'interval'
      end
    elseif not cutoff then
      cutoff = redis.call('LLEN', ikey)
      redis.call('HSET', meta, 'cutoff', cutoff)
    end
    if cutoff == 0 then
      -- nothing to deliver: drop the sequence instead of leaving a due entry that never clears
      redis.call('DEL', meta, ikey)
      redis.call('ZREM', due, member)
      retire(pfx, head, pfx .. 'ids', base, seq, retention)
    end
    if cutoff > 0 then
      local attempt = tonumber(f[3] or '0') + 1
      local flush_id = f[4] or (seed .. '-' .. n)
      redis.call('HSET', meta, 'attempt', attempt, 'owner', owner, 'flush_id', flush_id,
        'claimed_at', int(now), 'lease_until', int(now + lease), 'updated_at', int(now))
      redis.call('ZADD', due, int(now + lease), member)
      table.insert(out, member)
      table.insert(out, cutoff)
      table.insert(out, attempt)
      table.insert(out, flush_id)
      table.insert(out, reason or '')
    end
  end
end
local first = redis.call('ZRANGE', due, 0, 0, 'WITHSCORES')
if #first == 0 then
  out[1] = -1
else
  out[1] = math.max(0, tonumber(first[2]) - now)
end
return out
