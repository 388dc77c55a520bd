-- claim.lua: take due sequences from a partition's delay queue and lease them to a worker.
--
-- KEYS[1] due  pfx.."due"
-- ARGV[1] pfx
-- ARGV[2] limit          claim at most this many sequences
-- ARGV[3] lease_ms       lease length; the entry is re-scored to now + lease_ms, so a flush whose
--                        worker dies becomes due again when the lease runs out
-- ARGV[4] owner          random token of this claim; ack/nack/extend/release must present it
-- ARGV[5] id_seed        random string; new deliveries get flush_id = id_seed.."-"..i
-- ARGV[6] retention      seconds to keep head/history of a base id left without sequences
-- ARGV[7] max_batch_size largest delivery window
-- ARGV[8] max_attempts   (unused here: failures are counted by nack.lua)
-- ARGV[9] max_deaths     deliveries whose worker died (lease expired unsettled) before dead-letter
-- ARGV[10] bisect        '1': a window whose worker died is halved instead (poison isolation)
-- ARGV[11] ordered       '1': only the lowest active sequence of a base id is delivered
-- ARGV[12] history_cap   history length limit (deaths are recorded in the history)
-- ARGV[13] inline_max    windows of at most this many items are returned with the claim
--                        (saves the worker a round trip and a slow multi-bulk parse); 0 = never
-- Derived keys: head, history, state and items of each member; dead-letter keys.
-- Reply: {next_due_ms, member, window, attempt, flush_id, reason, items, ...}
--   next_due_ms  ms until the earliest remaining entry is due (0 = due now, -1 = queue empty)
--   then six fields per claimed sequence: deliver its first `window` items; `items` is 0 (read
--   them with LRANGE) or the window itself: one msgpack array of the raw entries (cmsgpack;
--   a plain array where cmsgpack is missing, as in test doubles).
local due = KEYS[1]
local pfx = ARGV[1]
local limit = tonumber(ARGV[2])
local lease = tonumber(ARGV[3])
local owner, seed = ARGV[4], ARGV[5]
local cfg = {retention = tonumber(ARGV[6]), max = tonumber(ARGV[7]), ordered = ARGV[11] == '1'}
local max_deaths = tonumber(ARGV[9])
local bisect = ARGV[10] == '1'
local cap = tonumber(ARGV[12])
local inline_max = tonumber(ARGV[13] or '0')
local now = now_ms()
local out = {0}
local members = redis.call('ZRANGEBYSCORE', due, '-inf', int(now), 'LIMIT', 0, limit)
for n, member in ipairs(members) do
  local meta = pfx .. 's:' .. member
  local base, seq = split_member(member)
  local f = redis.call('HMGET', meta, 'status', 'cutoff', 'attempt', 'flush_id', 'reason', 'owner',
    'deaths', 'window', 'last_error', 'created_at', 'claimed_at', 'fid_n', 'tries')
  if (not base) or (not f[1]) then
    -- an entry whose sequence no longer exists: nothing to deliver
    redis.call('ZREM', due, member)
  else
    local head = pfx .. 'b:' .. base
    local ikey = pfx .. 'i:' .. member
    local cutoff = tonumber(f[2])
    local reason = f[5]
    local deliver = true
    if f[1] == 'accumulating' then
      -- interval timer fired: seal with the current length as the cutoff
      cutoff = redis.call('LLEN', ikey)
      if cutoff > 0 then
        seal(pfx, head, due, base, seq, cutoff, 'interval', now)
        reason = 'interval'
      end
    elseif not cutoff then
      cutoff = redis.call('LLEN', ikey)
      redis.call('HSET', meta, 'cutoff', cutoff)
    end
    if cutoff == 0 then
      -- nothing to deliver: drop the sequence instead of leaving a due entry that never clears
      redis.call('DEL', meta, ikey)
      redis.call('ZREM', due, member)
      retire(pfx, head, pfx .. 'ids', base, seq, cfg.retention)
      deliver = false
    end
    if deliver and cfg.ordered then
      local low = lowest_active(head)
      if low and low < tonumber(seq) then
        -- an earlier sequence is still in flight or retrying: wait until it is done
        redis.call('ZREM', due, member)
        redis.call('HSET', meta, 'parked', 1)
        deliver = false
      end
    end
    local attempt = tonumber(f[3] or '0')
    local flush_id = f[4]
    local window = math.min(tonumber(f[8] or cutoff), cutoff, cfg.max)
    local fid_n = tonumber(f[12] or '0')
    if flush_id and fid_n > 0 then
      window = math.min(window, fid_n)  -- never mix items of an earlier delivery with new ones
    end
    if deliver and f[6] and f[6] ~= '' then
      -- the previous delivery was never settled: its worker died or lost its lease
      local deaths = tonumber(f[7] or '0') + 1
      local err = 'worker died or lost its lease during the handler'
      push_history(pfx .. 'h:' .. base, history_entry(seq, window, tonumber(f[11] or now), 0,
        false, err, attempt, flush_id, reason), cap)
      if bisect and window > 1 then
        -- the crash may be caused by one item: deliver the first half on its own (same
        -- flush_id: the dead worker's handler may have processed these items)
        window = math.ceil(window / 2)
        redis.call('HSET', meta, 'deaths', 0, 'last_error', err)
      elseif deaths >= max_deaths then
        local why = 'max_deaths'
        local whole = window == redis.call('LLEN', ikey)
        local items = nil
        if not whole then items = pop_head(ikey, window) end
        bury(pfx, (flush_id or (seed .. '-' .. n)) .. '.' .. cutoff, member, items, window, why, f[9] or err,
          {tries = tonumber(f[13] or '0'), deaths = deaths, flush_id = flush_id, created_at = f[10]}, now)
        advance(pfx, base, seq, window, now, cfg)
        deliver = false
      else
        redis.call('HSET', meta, 'deaths', deaths, 'last_error', err)
      end
    end
    if deliver then
      attempt = attempt + 1
      if not flush_id then
        flush_id = seed .. '-' .. n
        fid_n = window
      end
      redis.call('HSET', meta, 'attempt', attempt, 'owner', owner, 'flush_id', flush_id, 'fid_n', fid_n,
        'window', window, 'claimed_at', int(now), 'lease_until', int(now + lease),
        'updated_at', int(now))
      redis.call('ZADD', due, int(now + lease), member)
      table.insert(out, member)
      table.insert(out, window)
      table.insert(out, attempt)
      table.insert(out, flush_id)
      table.insert(out, reason or '')
      if window <= inline_max then
        local items = redis.call('LRANGE', ikey, 0, window - 1)
        if cmsgpack then items = cmsgpack.pack(items) end
        table.insert(out, items)
      else
        table.insert(out, 0)
      end
    end
  end
end
local first = redis.call('ZRANGE', due, 0, 0, 'WITHSCORES')
if #first == 0 then
  out[1] = -1
else
  out[1] = math.max(0, tonumber(first[2]) - now)
end
return out
