-- flush_id_of.lua: the flush_id of sequence `seq` of a base id, sealed at `us` (microseconds,
-- server clock): "<us>-<tag>-<N>". Costs a hash of pfx..base, paid when sealing only.
--- @include "int"

-- `flush_id` (what handlers deduplicate by) is decided when the sequence is sealed, written
-- with the sealed state by whatever seals it (add.lua at max_batch_size, flush.lua, the claim
-- that finds an interval due, replay.lua), and only read by the claims that deliver it: a claim
-- that a failover lost, or whose worker died, is redelivered under the same id. It is
--   "<sealed at, in us>-<tag>-<N>"    e.g. "1795956439667412-d8d3bd6517c8-0"
-- the sealing call's TIME in microseconds, 12 hex digits of the SHA-1 of pfx..base (prefix,
-- processor, partition and base id; a 48-bit hash of the same where redis.sha1hex is missing,
-- as in test doubles) and the sequence number. Sequences sealed by one call share its time and
-- differ in base id (by its tag: equal tags, 1 in 2^48) or number; a base id deleted or expired
-- seals its restarted numbers at later times. Once the first `fid_n` items have all left the
-- sequence, the rest is a new flush under the sealed id plus "-<k>" (`fid_k` = k = 1, 2, ...),
-- written by the call that removed them (advance.lua), so it too is fixed before any claim. (A
-- sequence sealed by a version from before this keeps the id it was claimed under; one without
-- any gets the id its `sealed_at` ms gives, at its first claim.)
local function flush_id_of(pfx, base, seq, us)
  local s, tag = pfx .. base, nil
  if redis.sha1hex then
    tag = string.sub(redis.sha1hex(s), 1, 12)
  else
    -- test doubles without redis.sha1hex: two 24-bit polynomial hashes
    local a, b = 0, 0
    for i = 1, #s do
      local c = string.byte(s, i)
      a, b = (a * 257 + c) % 16777213, (b * 263 + c) % 16777199
    end
    tag = string.format('%06x%06x', a, b)
  end
  return int(us) .. '-' .. tag .. '-' .. int(seq)
end
