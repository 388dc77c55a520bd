-- history_entry.lua: a flush-history entry (JSON) with the fields the worker's entries have
-- (redis_batcher.ops.history_entry), for a delivery whose worker died.

local function history_entry(seq, count, started, duration, ok, err, attempt, flush_id, reason)
  return cjson.encode({seq = tonumber(seq), items = count, started_at = started,
    duration_ms = duration, success = ok, error = err, attempt = attempt,
    flush_id = flush_id or '', reason = reason or ''})
end
