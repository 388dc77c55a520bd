-- move_step.lua: work on a move job for at most `budget` items; returns the work done and
-- whether it is finished.
--- @include "marked"

-- Move jobs keep the work per call bounded: moving part of a window out of a list
-- (dead-lettering a window smaller than its list, a partial failure, undecodable entries) is a
-- job kept in the sequence's state (mv_* fields) and done at most MOVE_BUDGET items per call, by
-- the nack (move_start.lua) and then by the claims that find the sequence due (claim_due.lua).
-- The first mv_w items of a sequence's list (the window) are taken from its head one by one;
-- each goes to the fate of its kind -- 'K' kept (pushed to the list's tail, behind the rest), 'D'
-- dropped (delivered), 'X' to the dead letter mv_dead's list. mv is two letters: the fate of the
-- marked items (bit i of mv_marks, LSB first, for window item i; no mv_marks: every item is
-- marked), then of the others. Then the kept items are brought back before the rest (mv_rest
-- items; the shorter side is moved) and mv_end finishes the job (move_finish.lua).
local function move_step(pfx, member, j, budget)
  local ikey = pfx .. 'i:' .. member
  local dlist = j.dead and (pfx .. 'di:' .. j.dead)
  local fm, fu = string.sub(j.mv, 1, 1), string.sub(j.mv, 2, 2)
  local work = 0
  while j.done < j.w and work < budget do
    local items = redis.call('LPOP', ikey, math.min(j.w - j.done, budget - work, 5000))
    if not items then
      j.done = j.w  -- the list ran out (evicted?): nothing more to take
      break
    end
    local keep, out = {}, {}
    for k, it in ipairs(items) do
      local fate = marked(j.marks, j.done + k - 1) and fm or fu
      if fate == 'K' then
        keep[#keep + 1] = it
      elseif fate == 'X' then
        out[#out + 1] = it
      end
    end
    if #keep > 0 then redis.call('RPUSH', ikey, unpack(keep)) end
    if #out > 0 then redis.call('RPUSH', dlist, unpack(out)) end
    j.done, j.keep, j.out = j.done + #items, j.keep + #keep, j.out + #out
    work = work + #items
  end
  if j.done < j.w then return work, false end
  -- the list is now the rest, then the kept items: move the shorter side round
  local turn = math.min(j.keep, j.rest)
  local from, to = 'RIGHT', 'LEFT'
  if j.keep > j.rest then from, to = 'LEFT', 'RIGHT' end
  while j.rot < turn and work < budget do
    redis.call('LMOVE', ikey, ikey, from, to)
    j.rot, work = j.rot + 1, work + 1
  end
  return work, j.rot >= turn
end
