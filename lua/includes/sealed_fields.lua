-- sealed_fields.lua: the sequence-hash fields of a sealed sequence (field, value, ...), ready
-- for HSET; fid: the flush_id it gets (flush_id_of).
--- @include "int"

local function sealed_fields(count, reason, now, fid)
  return {'status', 'flushing', 'cutoff', count, 'sealed_at', int(now), 'reason', reason,
    'updated_at', int(now), 'flush_id', fid}
end
