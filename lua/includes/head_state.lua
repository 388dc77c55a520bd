-- head_state.lua: a base id's head, read once: {next, acc, active, pending, done_seq,
-- done_items} (nil fields: absent), or nil and what is wrong with it (another type, a field that
-- is not an integer).
--- @include "quote"
--- @include "key_type"
--- @include "is_int"

local function head_state(head)
  local v = redis.pcall('HMGET', head, 'next', 'acc', 'active', 'pending', 'done_seq', 'done_items')
  if v.err then
    return nil, head .. ' is a ' .. key_type(head) .. ', not a hash'
  end
  for i = 1, 6 do
    if not is_int(v[i]) then
      return nil, head .. ' holds ' .. quote(v[i]) .. ' where an integer belongs'
    end
  end
  return v, nil
end
