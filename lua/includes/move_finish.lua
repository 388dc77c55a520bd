-- move_finish.lua: finish a move job: its window's items went where the job said. mv_end:
--   'retry'    a partial failure: the failed items stay first, due again at mv_at
--   'advance'  the items that left the window are done with (advance)
-- Returns the outcome and its detail, as nack.lua replies.
--- @include "int"
--- @include "split_member"
--- @include "advance"
--- @include "register_dead"
--- @include "move_fields"
--- @include "pending_delta"

local function move_finish(pfx, member, j, now, cfg, dead)
  local base, seq = split_member(member)
  local meta = pfx .. 's:' .. member
  local f = redis.call('HMGET', meta, 'cutoff', 'fid_n', 'max', 'tries', 'deaths', 'flush_id',
    'created_at', 'fid_k')
  redis.call('HDEL', meta, unpack(move_fields()))
  if j.dead then
    if j.out > 0 then
      register_dead(pfx, j.dead, base, seq, j.out, j.reason, j.err, {tries = f[4], deaths = f[5],
        flush_id = f[6], created_at = f[7]}, now, dead)
    else
      redis.call('DEL', pfx .. 'di:' .. j.dead)
    end
  end
  local gone = j.w - j.keep  -- the window's items that left the sequence
  local dropped = gone - j.out  -- of which delivered (a partial failure's others)
  if dropped > 0 then redis.call('HINCRBY', meta, 'delivered', dropped) end
  if j.finish == 'retry' then
    local head = pfx .. 'b:' .. base
    pending_delta(pfx, head, -gone)
    local cutoff = tonumber(f[1]) - gone
    if j.keep == 0 then
      -- none failed: the window's items all left (its flush_id with them, unless the rest was
      -- delivered under it too)
      redis.call('HSET', meta, 'cutoff', cutoff)
      return 'delivered', advance(pfx, base, seq, 0, now, cfg,
        {cutoff, tonumber(f[2] or '0') - gone, f[3], f[6], f[8]})
    end
    -- the failed items stay at the head and keep their flush_id
    redis.call('HSET', meta, 'cutoff', cutoff, 'window', j.keep,
      'fid_n', math.max(tonumber(f[2] or '0') - gone, j.keep), 'owner', '', 'last_error', j.err,
      'next_attempt_at', int(j.at), 'updated_at', int(now))
    redis.call('HDEL', meta, 'lease_until')
    redis.call('ZADD', pfx .. 'due', int(j.at), member)
    return 'retry', j.at
  end
  local left = advance(pfx, base, seq, gone, now, cfg, {f[1], f[2], f[3], f[6], f[8]})
  if j.reason == 'decode_error' then return 'quarantined', left end
  return 'dead', left
end
