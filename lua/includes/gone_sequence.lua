-- gone_sequence.lua: whether a sequence number of a base id that has no state ran and left
-- (below the head's next number: completed) rather than never existed.

local function gone_sequence(head, seq)
  return tonumber(seq) < tonumber(redis.call('HGET', head, 'next') or '0')
end
