-- retry.lua: manual retry -- a base id's sequences that wait for a retry (a failed delivery's
-- backoff) become due now, so a worker delivers them at once; their attempt counts are kept.
--
-- KEYS[1] head  pfx.."b:"..base
-- KEYS[2] due   pfx.."due"
-- KEYS[3] guard pfx.."guard": never written, so no script of a migrating slot runs
-- ARGV[1] pfx
-- ARGV[2] base
-- ARGV[3] seq      the sequence number to retry, or '' for every one of the base id waiting
-- Derived keys: the pfx.."s:" state of each sequence looked at; wakes a worker: sets the
-- wake-up token pfx.."woke", publishes on the channel pfx.."wake".
-- Reply: {code, seq, count, status, retried...} (flush.lua's shape)
--   code 'retried'   the sequences `retried...` (ascending) are due now, holding count items;
--                    seq: the first of them
--        'none'      nothing waits for a retry (status: the named sequence's, else '')
--        'not_found' unknown base id or sequence
--        'corrupt'   the keys hold something else (status: what); nothing written
--- @include "now_ms"
--- @include "head_problem"
--- @include "wrong_type"
--- @include "waiting_retries"
--- @include "retry_now"
--- @include "wake_always"
--- @include "gone_sequence"

local head, due = KEYS[1], KEYS[2]
local pfx, base, want = ARGV[1], ARGV[2], ARGV[3]
local why = head_problem(head) or wrong_type({due, 'zset'})
if why then
  return {'corrupt', -1, 0, why}
end
if redis.call('EXISTS', head) == 0 then
  return {'not_found', -1, 0, ''}
end
local now = now_ms()
local seqs = nil
local status = ''
if want ~= '' then
  status = redis.call('HGET', head, 'a:' .. want)
  if not status then
    if gone_sequence(head, want) then
      return {'none', tonumber(want), 0, 'completed'}
    end
    return {'not_found', tonumber(want), 0, ''}
  end
  seqs = {tonumber(want)}
end
local waiting
waiting, why = waiting_retries(pfx, due, head, base, seqs, now)
if why then
  return {'corrupt', -1, 0, why}
end
if #waiting == 0 then
  return {'none', want ~= '' and tonumber(want) or -1, 0, status}
end
local retried, count = retry_now(pfx, due, base, waiting, now)
wake_always(pfx)
local reply = {'retried', retried[1], count, 'flushing'}
for _, seq in ipairs(retried) do table.insert(reply, seq) end
return reply
