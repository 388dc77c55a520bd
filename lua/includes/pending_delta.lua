-- pending_delta.lua: n items entered (n > 0) or left (n < 0) a base id's sealed sequences. The
-- head's pending count (what max_pending checks) follows, never below 0, and so does the
-- partition's, pfx.."pending" (what the metrics and `top` show: one GET per partition, however
-- many batch ids; absent = 0). That one is advisory: a key holding something else is left as it is
-- (pcall) rather than failing a write of items. Returns the head's new count.
--- @include "int"

local function partition_pending(pfx, n)
  if n == 0 then return end
  local total = redis.pcall('INCRBY', pfx .. 'pending', int(n))
  -- at 0 (or below, should it have drifted) the key goes: a drained partition leaves no keys
  if type(total) == 'number' and total <= 0 then redis.call('DEL', pfx .. 'pending') end
end

local function pending_delta(pfx, head, n)
  local count = redis.call('HINCRBY', head, 'pending', int(n))
  if count < 0 then
    redis.call('HSET', head, 'pending', 0)
    n = n - count  -- only what the head had left
    count = 0
  end
  partition_pending(pfx, n)
  return count
end
