-- advance.lua: `n` items left the head of a sealed sequence (delivered or dead-lettered).
-- Either the sequence is done (completed) or the rest becomes a fresh delivery, due now.
-- cfg: {retention=, ordered=, max=}; known: {cutoff, fid_n, max, flush_id, fid_k, created_at}
-- when the caller has read them; done: the sequence's delivered item count when an ack
-- completes it (the head then records the highest completed sequence: done_seq, done_items,
-- done_at, and done_created, its created_at: '' when the caller did not read it)
--- @include "int"
--- @include "member_of"
--- @include "unpark"
--- @include "retire"
--- @include "pending_delta"

local function advance(pfx, base, seq, n, now, cfg, known, done)
  local member = member_of(base, seq)
  local meta = pfx .. 's:' .. member
  local head = pfx .. 'b:' .. base
  local due = pfx .. 'due'
  local f = known or redis.call('HMGET', meta, 'cutoff', 'fid_n', 'max', 'flush_id', 'fid_k')
  local left = tonumber(f[1] or '0') - n
  if left > 0 then
    pending_delta(pfx, head, -n)
    redis.call('HSET', meta, 'cutoff', left, 'window', math.min(left, tonumber(f[3] or cfg.max)),
      'owner', '', 'updated_at', int(now))
    redis.call('HDEL', meta, 'lease_until', 'next_attempt_at')
    -- items already delivered under a flush_id keep it (and their attempt count) until they
    -- leave the sequence, so a handler can always recognise a redelivery
    local fid_n = tonumber(f[2] or '0') - n
    if fid_n > 0 then
      redis.call('HSET', meta, 'fid_n', fid_n)
    elseif f[4] then
      -- the rest is a new flush: the sealed flush_id plus "-<k>", fixed here, before its claim
      -- (the current one is the sealed id plus "-<fid_k>" when fid_k is set)
      local id, k = f[4], tonumber(f[5] or '0')
      if k > 0 then id = string.sub(id, 1, #id - #int(k) - 1) end
      redis.call('HSET', meta, 'attempt', 0, 'tries', 0, 'deaths', 0, 'flush_id', id .. '-' .. int(k + 1),
        'fid_k', int(k + 1))
      redis.call('HDEL', meta, 'fid_n', 'last_error')
    else
      -- never delivered under an id (sealed by an older version): its claim gives it one
      redis.call('HSET', meta, 'attempt', 0, 'tries', 0, 'deaths', 0)
      redis.call('HDEL', meta, 'fid_n', 'last_error')
    end
    redis.call('ZADD', due, int(now), member)
    return left
  end
  redis.call('DEL', meta)
  redis.call('ZREM', due, member)
  -- the head's counters, index and completion record: one read, one HDEL, one HSET
  local h = redis.call('HMGET', head, 'pending', 'acc', 'active', 'done_seq')
  local was = tonumber(h[1] or '0')
  local set = {'pending', int(math.max(was - n, 0))}
  partition_pending(pfx, math.max(was - n, 0) - was)
  if done and tonumber(seq) >= tonumber(h[4] or '-1') then
    -- concurrent flushes finish in any order: keep the highest completed sequence
    for _, v in ipairs({'done_seq', seq, 'done_items', done, 'done_at', int(now), 'done_created', f[6] or ''}) do
      table.insert(set, v)
    end
  end
  retire(pfx, head, pfx .. 'ids', base, seq, cfg.retention, {h[2], h[3]}, set)
  if cfg.ordered then unpark(pfx, head, due, base, now) end
  return 0
end
