-- claim_due.lua: take up to o.limit due sequences from a partition's delay queue and lease
-- them to o.owner (claim.lua; ack.lua when the worker asks for its next flush with the ack).
--- @include "constants"
--- @include "int"
--- @include "split_member"
--- @include "is_int"
--- @include "partition_problem"
--- @include "push_history"
--- @include "seal_head"
--- @include "flush_id_of"
--- @include "sealed_fields"
--- @include "open_header"
--- @include "open_items_of"
--- @include "seal_items"
--- @include "lowest_active"
--- @include "retire"
--- @include "advance"
--- @include "bury_list"
--- @include "history_entry"
--- @include "next_due_ms"
--- @include "move_job"
--- @include "move_step"
--- @include "move_later"
--- @include "move_finish"
--- @include "bury_window"
--- @include "quarantine_member"
--- @include "read_member"

-- A sealed sequence's list holds `cutoff` undelivered items at its head. Each claim delivers
-- the first `window` of them (window <= cutoff, <= the sequence's max). Acks, partial failures
-- and dead-lettering remove items from the head; what is left is delivered next. The first
-- `fid_n` items were delivered under `flush_id` (flush_id_of.lua): they keep it on every
-- redelivery (bisected or not). `attempt` counts deliveries of those items (what handlers see);
-- `tries` counts the failed ones that spend the max_attempts budget (bisection steps do not),
-- `deaths` the deliveries whose worker died.
--
-- Returns claim.lua's reply: {next_due_ms, then six fields per claimed sequence}; next_due_ms is
-- BACKLOG_DUE when at least BACKLOG more sequences were due than it took (a backlog: the worker
-- then spreads them over its threads). Looking BACKLOG entries further with the same
-- ZRANGEBYSCORE also spares the ZRANGE of next_due_ms whenever more is due. The partition's own
-- keys are checked once something is due (CORRUPT_DUE and what is wrong, nothing written);
-- every member is checked before it is written. now, sub: the time in ms and the microseconds
-- past it (an interval seal's flush_id). A flush is delivered under the flush_id its state
-- holds.

-- A claim looks this many entries past its limit; BACKLOG_DUE is its reply when it found them
-- (redis_batcher.ops.BACKLOG_DUE).
local BACKLOG, BACKLOG_DUE = 8, -2
-- A claim's reply when the partition's own keys hold something else (ops.CORRUPT_DUE).
local CORRUPT_DUE = -3

local function claim_due(due, pfx, o, now, sub)
  local limit, lease, owner, seed = o.limit, o.lease, o.owner, o.seed
  local cfg, max_deaths, bisect, cap, inline_max = o.cfg, o.max_deaths, o.bisect, o.cap, o.inline_max
  local out = {0}
  local budget = MOVE_BUDGET
  local again = false  -- a move job went on: what is due now may not have been looked at
  local members = redis.call('ZRANGEBYSCORE', due, '-inf', int(now), 'LIMIT', 0, limit + BACKLOG)
  local found = #members
  if found > 0 then
    local why = partition_problem(pfx)
    if why then return {CORRUPT_DUE, why} end
  end
  for n = 1, math.min(found, limit) do
    local member = members[n]
    local meta = pfx .. 's:' .. member
    local base, seq = split_member(member)
    local f, held, h, why = read_member(pfx, member)
    local job = (not why) and move_job(f)
    if why then
      local id = quarantine_member(pfx, member, why, 'q' .. seed .. '-' .. n, now, cfg, o.dead)
      for _, v in ipairs({member, -1, 0, id, 'quarantine', why}) do table.insert(out, v) end
    elseif job then
      -- a move job left unfinished by a nack (or an earlier claim): go on with it
      if budget > 0 then
        local work, finished = move_step(pfx, member, job, budget)
        budget = budget - work
        if finished then
          move_finish(pfx, member, job, now, cfg, o.dead)
        else
          move_later(pfx, member, job, now)
        end
      end
      again = true  -- it may be due now still (or again)
    else
      local head = pfx .. 'b:' .. base
      local ikey = pfx .. 'i:' .. member
      local smax = tonumber(f.max or cfg.max)
      local cutoff = tonumber(f.cutoff)
      local reason = f.reason
      local deliver = true
      local sealing = false
      if f.status == 'accumulating' then
        -- interval timer fired (or flush_idle's): seal with the current length as the cutoff
        -- (the sequence's own fields and its due entry are written once, with the delivery
        -- below); the open list becomes the sequence's list, so later adds open the next one
        local open, okey, how = open_items_of(pfx, base, seq, h[2])
        if how == 'damaged' then
          redis.call('LSET', okey, 0, open_header(seq, now, smax))  -- its items are delivered
        end
        if open == 0 and (how == 'own' or how == 'damaged') then
          redis.call('DEL', okey)  -- its header alone
        end
        cutoff = seal_items(pfx, head, base, seq, open)
        if cutoff > 0 then
          seal_head(head, seq)
          sealing = true
          reason = 'interval'
          -- opened with flush_idle (add.lua) and due before its flush_interval deadline: it was
          -- left without an add for flush_idle
          local iv = tonumber(f.interval or '') or -1
          if f.idle and (iv < 0 or now < (tonumber(f.created_at or '') or 0) + iv) then
            reason = 'idle'
          end
        end
      elseif not cutoff then
        cutoff = held
        redis.call('HSET', meta, 'cutoff', cutoff)
      end
      local flush_id = f.flush_id
      if sealing then
        flush_id = flush_id_of(pfx, base, seq, now * 1000 + sub)
      elseif not flush_id and f.status == 'flushing' then
        -- sealed by a version from before flush_id was fixed at sealing: the id its seal's ms
        -- gives, the same at every claim until one has written it
        flush_id = flush_id_of(pfx, base, seq, (is_int(f.sealed_at) and tonumber(f.sealed_at or '0') or 0) * 1000)
      end
      local info = {tries = tonumber(f.tries or '0'), deaths = tonumber(f.deaths or '0'), flush_id = flush_id,
        created_at = f.created_at}
      if cutoff == 0 then
        -- nothing to deliver: drop the sequence instead of leaving a due entry that never clears
        redis.call('DEL', meta, ikey)
        redis.call('ZREM', due, member)
        retire(pfx, head, pfx .. 'ids', base, seq, cfg.retention)
        deliver = false
      elseif not sealing then
        if held < cutoff then
          -- items vanished (evicted, deleted): never an empty or short delivery that is then
          -- acknowledged; what is left goes to the dead-letter store
          local err = (cutoff - held) .. ' of ' .. cutoff .. ' items are missing from ' .. ikey
            .. ' (evicted or deleted)'
          bury_list(pfx, (flush_id or (seed .. '-' .. n)) .. '.m' .. cutoff, member, held, 'items_missing',
            err, info, now, o.dead)
          advance(pfx, base, seq, cutoff, now, cfg, {cutoff, f.fid_n, f.max, flush_id, f.fid_k})
          deliver = false
        end
      end
      if deliver and cfg.ordered then
        local low = lowest_active(head)
        if low and low < tonumber(seq) then
          -- an earlier sequence is still in flight or retrying: wait until it is done
          redis.call('ZREM', due, member)
          redis.call('HSET', meta, 'parked', 1)
          if sealing then
            redis.call('HSET', meta, unpack(sealed_fields(cutoff, reason, now, flush_id)))
          end
          deliver = false
        end
      end
      local attempt = tonumber(f.attempt or '0')
      local window = math.min(tonumber(f.window or cutoff), cutoff, smax)
      local fid_n = tonumber(f.fid_n or '0')
      if fid_n > 0 then
        window = math.min(window, fid_n)  -- never mix items of an earlier delivery with new ones
      end
      if deliver and f.owner and f.owner ~= '' then
        -- the previous delivery was never settled: its worker died or lost its lease
        local deaths = tonumber(f.deaths or '0') + 1
        local err = 'worker died or lost its lease during the handler'
        push_history(pfx .. 'h:' .. base, history_entry(seq, window, tonumber(f.claimed_at or now), 0,
          false, err, attempt, flush_id, reason), cap)
        if bisect and window > 1 then
          -- the crash may be caused by one item: deliver the first half on its own (same
          -- flush_id: the dead worker's handler may have processed these items)
          window = math.ceil(window / 2)
          redis.call('HSET', meta, 'deaths', 0, 'last_error', err)
        elseif deaths >= max_deaths then
          info.deaths = deaths
          redis.call('HSET', meta, 'deaths', deaths)  -- what the dead letter records
          if bury_window(pfx, (flush_id or (seed .. '-' .. n)) .. '.' .. cutoff, member, window,
              'max_deaths', f.last_error or err, info, now, cfg, o.dead, budget) == 'moving' then
            again = true
          end
          budget = math.max(budget - window, 0)
          deliver = false
        else
          redis.call('HSET', meta, 'deaths', deaths, 'last_error', err)
        end
      end
      if deliver then
        attempt = attempt + 1
        if fid_n <= 0 then
          fid_n = window  -- the first delivery under flush_id: these items keep it from now on
        end
        local items = 0
        if window <= inline_max then
          items = redis.call('LRANGE', ikey, 0, window - 1)
          if cmsgpack then items = cmsgpack.pack(items) end
        end
        -- the lease, and (after an interval seal) the sealed state with its flush_id, in one
        -- write; a flush_id the state holds is only read (one from sealed_at is written)
        local fields = sealing and sealed_fields(cutoff, reason, now, flush_id) or {'updated_at', int(now)}
        if not sealing and flush_id ~= f.flush_id then
          table.insert(fields, 'flush_id')
          table.insert(fields, flush_id)
        end
        redis.call('HSET', meta, 'attempt', attempt, 'owner', owner, 'fid_n', fid_n,
          'window', window, 'claimed_at', int(now), 'lease_until', int(now + lease), unpack(fields))
        redis.call('ZADD', due, int(now + lease), member)
        for _, v in ipairs({member, window, attempt, flush_id, reason or '', items}) do
          table.insert(out, v)
        end
      end
    end
  end
  if found >= limit + BACKLOG then
    out[1] = BACKLOG_DUE
  elseif found > limit then
    out[1] = 0  -- more is due now
  else
    out[1] = next_due_ms(due, now)
  end
  if again and out[1] ~= BACKLOG_DUE then out[1] = 0 end
  return out, found > limit
end
