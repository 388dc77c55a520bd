-- move_job.lua: the move job of a sequence (nil when none), from its state.
-- f: the sequence's fields (seq_state).

local function move_job(f)
  if not f.mv then return nil end
  return {mv = f.mv, w = tonumber(f.mv_w), done = tonumber(f.mv_done or '0'), keep = tonumber(f.mv_keep or '0'),
    rest = tonumber(f.mv_rest or '0'), rot = tonumber(f.mv_rot or '0'), out = tonumber(f.mv_out or '0'),
    dead = f.mv_dead, marks = f.mv_marks, finish = f.mv_end, at = tonumber(f.mv_at or '0'), err = f.mv_err,
    reason = f.mv_reason}
end
