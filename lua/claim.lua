#!lua flags=allow-oom
-- allow-oom: per flush a few lease fields, one capped history entry; dead letters are moved
-- claim.lua: take due sequences from a partition's delay queue and lease them to a worker.
--
-- KEYS[1] due    pfx.."due"
-- KEYS[2] paused pfx.."paused": while it exists nothing is claimed (paused.lua, pause.lua)
-- KEYS[3] guard  pfx.."guard": never written, so no script of a migrating slot runs
-- ARGV[1] pfx
-- ARGV[2] limit          claim at most this many sequences
-- ARGV[3] lease_ms       lease length; the entry is re-scored to now + lease_ms, so a flush whose
--                        worker dies becomes due again when the lease runs out
-- ARGV[4] owner          random token of this claim; ack/nack/extend/release must present it
-- ARGV[5] id_seed        random string; names the dead letters of members quarantined (and,
--                        were it ever missing, of a window without a flush_id). A flush's
--                        flush_id is fixed when it is sealed, not here (flush_id_of)
-- ARGV[6] retention      seconds to keep head/history of a base id left without sequences
-- ARGV[7] max_batch_size largest delivery window of a sequence that did not record its own
-- ARGV[8] max_deaths     deliveries whose worker died (lease expired unsettled) before dead-letter
-- ARGV[9] bisect         '1': a window whose worker died is halved instead (poison isolation)
-- ARGV[10] ordered       '1': only the lowest active sequence of a base id is delivered
-- ARGV[11] history_cap   history length limit (deaths are recorded in the history)
-- ARGV[12] inline_max    windows of at most this many items are returned with the claim
--                        (saves the worker a round trip and a slow multi-bulk parse); 0 = never
-- ARGV[13] dead_ttl_ms   dead letters are kept this long (0 = for ever)
-- ARGV[14] dead_max      at most this many dead letters per partition (0 = no limit)
-- Derived keys: head, history, state and items of each member; dead-letter keys; pfx.."ids";
--   pfx.."woke", the wake-up token (add.lua holds back wake-ups until a claim answered the
--   last one): deleted, or, when the claim leaves due entries beyond its limit (the worker's
--   free slots), set again and published, so that another worker takes the rest.
-- Reply: {next_due_ms, member, window, attempt, flush_id, reason, items, ...}
--   next_due_ms  ms until the earliest remaining entry is due (0 = due now, -1 = queue empty,
--                -2 = due now, and 8 or more sequences beyond those claimed: a backlog)
--   then six fields per claimed sequence: deliver its first `window` items; `items` is 0 (read
--   them with LRANGE) or the window itself: one msgpack array of the raw entries (cmsgpack;
--   a plain array where cmsgpack is missing, as in test doubles). A member that cannot be
--   delivered as it is was quarantined instead: its window is -1, its flush_id the dead
--   letter's id and its items what was wrong (claim_due).
--   {-3, what}  the partition's own keys hold something else (nothing was written)
--   {-1}        the partition is paused (nothing claimed; wake-ups held back: paused.lua)
--- @include "now_ms"
--- @include "wrong_type"
--- @include "answer_wake"
--- @include "claim_opts"
--- @include "claim_due"
--- @include "paused"

local pfx = ARGV[1]
if type(redis.pcall('ZCARD', KEYS[1])) == 'table' then
  return {-3, wrong_type({KEYS[1], 'zset'})}
end
if paused(pfx, KEYS[2]) then
  return {-1}
end
local now, sub = now_ms()
local reply, more = claim_due(KEYS[1], pfx, claim_opts(2), now, sub)
if reply[1] ~= -3 then
  -- a worker is looking: the next sealed sequence gets a wake-up again (see add.lua), or what
  -- this worker has no slot for goes to another one now
  answer_wake(pfx, more)
end
return reply
