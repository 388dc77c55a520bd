-- bury_window.lua: dead-letter the first `window` items of a sealed sequence: its whole list at
-- once when that is all it holds, else a move job. Returns nack.lua's outcome and detail.
--- @include "split_member"
--- @include "advance"
--- @include "bury_list"
--- @include "move_start"

local function bury_window(pfx, id, member, window, reason, err, f, now, cfg, dead, budget)
  local base, seq = split_member(member)
  if window >= redis.call('LLEN', pfx .. 'i:' .. member) then
    bury_list(pfx, id, member, window, reason, err, f, now, dead)
    return 'dead', advance(pfx, base, seq, window, now, cfg)
  end
  return move_start(pfx, member, {mv = 'XX', w = window, dead = id, finish = 'advance', err = err,
    reason = reason}, now, cfg, dead, budget)
end
