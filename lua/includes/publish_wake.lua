-- publish_wake.lua: wake the workers serving a partition: its pfx as a message on its channel
-- pfx.."wake" (the partition's hash tag, so the script's own slot). Redis 7+
-- (redis.REDIS_VERSION_NUM is set): SPUBLISH, sharded pub/sub, delivered by the slot's own node to
-- its subscribers and never broadcast over a cluster's bus; older servers, or one that refuses
-- SPUBLISH: PUBLISH on the same name. Workers subscribe the same way (redis_batcher.wake).

local function publish_wake(pfx)
  local channel = pfx .. 'wake'
  if redis.REDIS_VERSION_NUM and type(redis.pcall('SPUBLISH', channel, pfx)) == 'number' then
    return
  end
  redis.call('PUBLISH', channel, pfx)
end
