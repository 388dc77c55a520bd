#!lua flags=allow-oom
-- allow-oom: frees the window; adds one capped history entry, a few fields (its claim: claim.lua)
-- ack.lua: a handler succeeded -- remove exactly the delivered window and move on.
--
-- KEYS[1] due      pfx.."due"
-- KEYS[2] head     pfx.."b:"..base
-- KEYS[3] history  pfx.."h:"..base
-- KEYS[4] ids      pfx.."ids"
-- KEYS[5] paused   pfx.."paused": while it exists the ack claims nothing (paused.lua)
-- KEYS[6] guard    pfx.."guard": never written, so no script of a migrating slot runs
-- ARGV[1] pfx
-- ARGV[2] member         "base::N"
-- ARGV[3] owner          token from claim.lua; a worker that lost its lease is refused
-- ARGV[4] entry          history record (JSON)
-- ARGV[5] cap            history length limit
-- ARGV[6] retention      seconds to keep head/history once the base id has no active sequence
-- ARGV[7] max_batch_size largest delivery window (for what is left)
-- ARGV[8] ordered        '1' for ordered processors (wake the next parked sequence)
-- ARGV[9..]  optional, 13 values: claim.lua's ARGV[2..14] (limit, lease_ms, owner, id_seed, retention,
--                        max_batch_size, max_deaths, bisect, ordered, history_cap, inline_max,
--                        dead_ttl_ms, dead_max). The worker asks for its next flush with
--                        the ack: after a successful ack, up to `limit` due sequences are claimed as
--                        claim.lua does (one round trip per flush instead of two). When that claim
--                        finds nothing due, pfx.."woke" is deleted as claim.lua does; when it
--                        leaves due entries beyond its limit, the token goes out again
--                        (claim.lua) unless one is out already. A paused partition's claim
--                        takes nothing and answers {-1}, as claim.lua does.
-- Derived keys: pfx.."s:"..member, pfx.."i:"..member (and claim.lua's, when claiming).
-- Reply: {code, left} or, when claiming, {code, left, <claim.lua's reply>}
--   code 'ok' | 'lease_lost' (nothing changed, nothing claimed) | 'corrupt' (left: what is
--   wrong; nothing changed); left = sealed items still to deliver
-- KEYS[2] (the head) is checked for damage here; advance() derives its name from pfx and writes it
--- @include "now_ms"
--- @include "split_member"
--- @include "head_problem"
--- @include "seq_state"
--- @include "partition_problem"
--- @include "push_history"
--- @include "answer_wake"
--- @include "advance"
--- @include "claim_opts"
--- @include "claim_due"
--- @include "paused"

local due, hist = KEYS[1], KEYS[3]
local pfx, member, owner = ARGV[1], ARGV[2], ARGV[3]
local cfg = {retention = tonumber(ARGV[6]), max = tonumber(ARGV[7]), ordered = ARGV[8] == '1'}
local meta = pfx .. 's:' .. member
local ikey = pfx .. 'i:' .. member
-- the state and list read once, checked before anything is written
local why = partition_problem(pfx)
local f, held
if not why then f, held, why = seq_state(pfx, member) end
if not why then why = head_problem(KEYS[2]) end
if why then
  return {'corrupt', why}
end
if f.owner ~= owner or f.status ~= 'flushing' or not f.cutoff then
  return {'lease_lost', 0}
end
-- windows up to this many items are removed with one LTRIM (no UNLINK)
local SMALL_WINDOW = 1000
local window = tonumber(f.window or f.cutoff)
local now, sub = now_ms()
if window <= SMALL_WINDOW or window < held then
  redis.call('LTRIM', ikey, window, -1)  -- a list left empty is deleted
else
  redis.call('UNLINK', ikey)  -- a large window: its memory is freed in the background
end
push_history(hist, ARGV[4], tonumber(ARGV[5]))
local delivered = tonumber(f.delivered or '0') + window
if tonumber(f.cutoff) > window then
  redis.call('HSET', meta, 'delivered', delivered)  -- the sequence goes on: keep the count
end
local base, seq = split_member(member)
-- a completed sequence is recorded on the head (done_seq: the highest completed one)
local left = advance(pfx, base, seq, window, now, cfg,
  {f.cutoff, f.fid_n, f.max, f.flush_id, f.fid_k, f.created_at}, delivered)
if ARGV[9] and tonumber(ARGV[9]) > 0 then
  if paused(pfx, KEYS[5]) then
    return {'ok', left, -1}
  end
  local reply, more = claim_due(due, pfx, claim_opts(9), now, sub)
  if more or #reply == 1 then
    -- nothing due: the asking slot goes idle knowing all that is due, so it answers a pending
    -- wake-up like claim.lua (add.lua would otherwise hold the next one back); more due than
    -- it took: another worker is woken for the rest, unless a wake-up is out already
    answer_wake(pfx, more)
  end
  table.insert(reply, 1, left)
  table.insert(reply, 1, 'ok')
  return reply
end
return {'ok', left}
