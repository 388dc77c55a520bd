-- answer_wake.lua: a claim is done with the partition's wake-up token. It left due entries it
-- could not take (`more`: it found more than its limit, the asking worker's free slots): the
-- token goes out again, so that another worker with a free slot takes the rest (unless one is
-- out already). Else it is deleted: the claimer knows all that is due, so the next seal
-- publishes again.
--- @include "wake_workers"

local function answer_wake(pfx, more)
  if more then
    wake_workers(pfx)
  else
    redis.call('DEL', pfx .. 'woke')
  end
end
