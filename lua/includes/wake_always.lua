-- wake_always.lua: a wake-up whatever the token's state (a manual flush, a release, a replay):
-- the token is set and published, so that one worker claims.
--- @include "constants"
--- @include "publish_wake"

local function wake_always(pfx)
  redis.call('SET', pfx .. 'woke', '1', 'PX', WAKE_HOLD_MS)
  publish_wake(pfx)
end
