-- move_start.lua: start a move job on a sealed sequence and work on it for up to `budget`
-- items; returns nack.lua's outcome and detail ('moving', items still to move, when unfinished).
-- job: {mv, w, marks, dead (id or nil), finish, at, err, reason}
--- @include "int"
--- @include "fresh_dead_id"
--- @include "move_step"
--- @include "move_later"
--- @include "move_finish"

local function move_start(pfx, member, job, now, cfg, dead, budget)
  local meta = pfx .. 's:' .. member
  job.rest = redis.call('LLEN', pfx .. 'i:' .. member) - job.w
  if job.rest < 0 then
    job.w, job.rest = job.w + job.rest, 0
  end
  job.done, job.keep, job.rot, job.out = 0, 0, 0, 0
  local fields = {'mv', job.mv, 'mv_w', job.w, 'mv_rest', job.rest, 'mv_end', job.finish,
    'mv_at', int(job.at or 0), 'mv_err', job.err or '', 'mv_reason', job.reason or ''}
  if job.dead then
    job.dead = fresh_dead_id(pfx, job.dead)
    table.insert(fields, 'mv_dead')
    table.insert(fields, job.dead)
  end
  if job.marks then
    table.insert(fields, 'mv_marks')
    table.insert(fields, job.marks)
  end
  redis.call('HSET', meta, unpack(fields))
  local _, finished = move_step(pfx, member, job, budget)
  if finished then
    return move_finish(pfx, member, job, now, cfg, dead)
  end
  move_later(pfx, member, job, now)
  return 'moving', job.w - job.done + math.min(job.keep, job.rest) - job.rot
end
