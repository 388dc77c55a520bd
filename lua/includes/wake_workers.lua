-- wake_workers.lua: a wake-up, unless one is out already. A wake-up is a token, pfx.."woke"
-- (set for at most WAKE_HOLD_MS): of the workers it wakes, only the one that takes the token (a
-- DEL that answers 1, by a worker with a free slot: redis_batcher.worker_core) claims; the others
-- go back to waiting. While the token is out, a seal publishes nothing more (the worker that
-- takes it will claim what is due then, up to its free slots); each claim is done with it
-- (answer_wake.lua).
--- @include "constants"
--- @include "publish_wake"

local function wake_workers(pfx)
  if redis.call('SET', pfx .. 'woke', '1', 'NX', 'PX', WAKE_HOLD_MS) then
    publish_wake(pfx)
  end
end
