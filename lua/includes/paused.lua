-- paused.lua: whether a partition's claims are paused (`key`, pfx.."paused", set by pause.lua).
-- A paused partition's claim takes nothing and answers "nothing due" (-1): its worker waits for
-- a wake-up, which resuming sends (pause.lua). Meanwhile wake-ups are held back, the token set
-- without a message as wake_workers would, so that the seals of a paused partition wake its
-- workers at most once per WAKE_HOLD_MS instead of once per seal.
--- @include "constants"

local function paused(pfx, key)
  if redis.call('EXISTS', key) == 0 then
    return false
  end
  redis.call('SET', pfx .. 'woke', '1', 'PX', WAKE_HOLD_MS)
  return true
end
