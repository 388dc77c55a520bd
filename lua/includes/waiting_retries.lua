-- waiting_retries.lua: which sequences of a base id wait for a retry, read before anything is
-- written. One waits for a retry when it is flushing, no worker holds it (owner empty), no
-- move job is under way and its delay-queue entry lies after `now`: a failed delivery's
-- backoff. seqs: the numbers to look at, or nil for every flushing one the head indexes.
-- Returns {{seq, cutoff}, ...} in ascending order, or nil and what is wrong with their keys.
--- @include "member_of"
--- @include "seq_state"

local function waiting_retries(pfx, due, head, base, seqs, now)
  if not seqs then
    seqs = {}
    local fields = redis.call('HGETALL', head)
    for i = 1, #fields, 2 do
      local seq = string.match(fields[i], '^a:(%d+)$')
      if seq and fields[i + 1] == 'flushing' then table.insert(seqs, tonumber(seq)) end
    end
    table.sort(seqs)
  end
  local out = {}
  for _, seq in ipairs(seqs) do
    local member = member_of(base, seq)
    local f, _, why = seq_state(pfx, member)
    if why then return nil, why end
    if f.status == 'flushing' and (f.owner or '') == '' and not f.mv then
      local at = redis.call('ZSCORE', due, member)
      if at and tonumber(at) > now then
        table.insert(out, {tonumber(seq), tonumber(f.cutoff or '0')})
      end
    end
  end
  return out, nil
end
