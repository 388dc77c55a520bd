-- move_fields.lua: a move job's fields in the sequence's state (move_step.lua).

local function move_fields()
  return {'mv', 'mv_w', 'mv_done', 'mv_keep', 'mv_rest', 'mv_rot', 'mv_out', 'mv_dead', 'mv_marks',
    'mv_end', 'mv_at', 'mv_err', 'mv_reason'}
end
