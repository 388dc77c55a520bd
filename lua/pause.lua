#!lua flags=allow-oom
-- allow-oom: one small key set or deleted; pausing is for incidents, a full Redis among them
-- pause.lua: pause or resume the claims of one processor partition. While paused, adds go on
-- (sequences accumulate and seal as usual) but no claim takes a flush of the partition
-- (paused.lua, checked by claim.lua and by ack.lua's claim of the next flush); flushes already
-- claimed finish normally.
--
-- KEYS[1] paused pfx.."paused": the time the partition was paused (ms) while it is
-- KEYS[2] due    pfx.."due"
-- KEYS[3] guard  pfx.."guard": never written, so no script of a migrating slot runs
-- ARGV[1] pfx
-- ARGV[2] '1' pause, '0' resume
-- Derived keys: resuming a partition with due entries wakes a worker: sets the wake-up token
--   pfx.."woke", publishes on the channel pfx.."wake" (the paused claims answered "nothing
--   due", so no worker waits for what is due there).
-- Reply: 1 when the partition's state changed, 0 when it was paused (resumed) already
--- @include "now_ms"
--- @include "int"
--- @include "wake_always"

local flag, due = KEYS[1], KEYS[2]
if ARGV[2] == '1' then
  return redis.call('SET', flag, int(now_ms()), 'NX') and 1 or 0
end
if redis.call('DEL', flag) == 0 then
  return 0
end
local queued = redis.pcall('ZCARD', due)
if type(queued) ~= 'number' or queued > 0 then  -- another type: the woken claim reports it
  wake_always(ARGV[1])
end
return 1
