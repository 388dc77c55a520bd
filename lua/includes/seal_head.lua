-- seal_head.lua: the head's side of sealing: the sequence no longer takes adds and is indexed
-- as flushing.

local function seal_head(head, seq)
  if redis.call('HGET', head, 'acc') == tostring(seq) then
    redis.call('HDEL', head, 'acc')
  end
  redis.call('HSET', head, 'a:' .. seq, 'flushing')
end
