-- retire.lua: drop a sequence from its head's index; when no active sequence is left the base
-- id leaves the ids set and its head and history start their retention countdown. h: the head's
-- {acc, active} when the caller has read them; set: more head fields (field, value, ...) to
-- write with the new active count (one HDEL and one HSET on the head).

local function retire(pfx, head, ids, base, seq, retention, h, set)
  h = h or redis.call('HMGET', head, 'acc', 'active')
  if h[1] == tostring(seq) then
    redis.call('HDEL', head, 'a:' .. seq, 'acc')
  else
    redis.call('HDEL', head, 'a:' .. seq)
  end
  local active = tonumber(h[2] or '0') - 1
  set = set or {}
  table.insert(set, 'active')
  table.insert(set, math.max(active, 0))
  redis.call('HSET', head, unpack(set))
  if active <= 0 then
    redis.call('SREM', ids, base)
    if retention > 0 then
      redis.call('EXPIRE', head, retention)
      redis.call('EXPIRE', pfx .. 'h:' .. base, retention)
    end
  end
end
