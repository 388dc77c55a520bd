-- retry_now.lua: make the sequences waiting_retries found due now. Their attempt and try
-- counts and their flush_id are kept: a manual retry is one more delivery of the same flush,
-- and max_attempts goes on counting. Returns the sequence numbers and their item count.
--- @include "int"
--- @include "member_of"

local function retry_now(pfx, due, base, waiting, now)
  local seqs, items = {}, 0
  for _, w in ipairs(waiting) do
    local member = member_of(base, w[1])
    redis.call('ZADD', due, int(now), member)
    redis.call('HSET', pfx .. 's:' .. member, 'next_attempt_at', int(now), 'updated_at', int(now))
    table.insert(seqs, w[1])
    items = items + w[2]
  end
  return seqs, items
end
