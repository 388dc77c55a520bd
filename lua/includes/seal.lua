-- seal.lua: seal an accumulating sequence: it becomes 'flushing' with its cutoff and flush_id
-- recorded and is due now. count: its open list's items (see seal_items); now, sub: the time in
-- ms and the microseconds past it. Returns the sealed sequence's item count.
--- @include "int"
--- @include "member_of"
--- @include "seal_head"
--- @include "flush_id_of"
--- @include "sealed_fields"
--- @include "seal_items"

local function seal(pfx, head, due, base, seq, count, reason, now, sub)
  local member = member_of(base, seq)
  local total = seal_items(pfx, head, base, seq, count)
  redis.call('HSET', pfx .. 's:' .. member, unpack(sealed_fields(total, reason, now,
    flush_id_of(pfx, base, seq, now * 1000 + sub))))
  seal_head(head, seq)
  redis.call('ZADD', due, int(now), member)
  return total
end
