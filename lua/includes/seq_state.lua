-- seq_state.lua: a sequence's state, read once (HGETALL) as a table of its fields ({} when it
-- has none), and its list's length; or nil, nil and what is wrong with them (another type, a
-- number field that is not one, a status or move job this library does not write, or the keys of
-- the dead letter an unfinished move job fills).
--- @include "quote"
--- @include "key_type"
--- @include "wrong_type"
--- @include "is_int"

-- Data this library did not write -- a key of another type, a field that is not a number, a
-- damaged header -- is found by reading before a script writes anything (this, head_state,
-- wrong_type, partition_problem, ...), so no script stops half-way: the caller is told (a
-- 'corrupt' reply), or a due sequence that cannot be delivered as it is goes to the dead-letter
-- store with reason 'quarantine' (by the claim: read_member, quarantine_member).

-- The state fields the scripts compute with, each between spaces (a plain find, no table);
-- the kinds of move jobs (move_step.lua).
local SEQ_INT_FIELDS = ' cutoff window attempt tries deaths fid_n fid_k delivered claimed_at max mv_w mv_done mv_keep mv_rest mv_rot mv_out mv_at '
local MOVE_KINDS = ' KD XD XK XX '

local function seq_state(pfx, member)
  local meta = pfx .. 's:' .. member
  local flat = redis.pcall('HGETALL', meta)
  if flat.err then
    return nil, nil, meta .. ' is a ' .. key_type(meta) .. ', not a hash'
  end
  local llen = redis.pcall('LLEN', pfx .. 'i:' .. member)
  if type(llen) == 'table' then
    return nil, nil, pfx .. 'i:' .. member .. ' is a ' .. key_type(pfx .. 'i:' .. member) .. ', not a list'
  end
  local f = {}
  for i = 1, #flat, 2 do
    local k, v = flat[i], flat[i + 1]
    f[k] = v
    if string.find(SEQ_INT_FIELDS, ' ' .. k .. ' ', 1, true) and not is_int(v) then
      return nil, nil, meta .. ' field ' .. k .. ' is ' .. quote(v) .. ', not an integer'
    end
  end
  if f.status and f.status ~= 'accumulating' and f.status ~= 'flushing' then
    return nil, nil, meta .. ' field status is ' .. quote(f.status)
  end
  if f.mv then
    if not string.find(MOVE_KINDS, ' ' .. f.mv .. ' ', 1, true) or (f.mv_end ~= 'retry'
        and f.mv_end ~= 'advance') or (string.sub(f.mv, 1, 1) == 'X' and not f.mv_dead) then
      return nil, nil, meta .. ' holds a move job ' .. quote(f.mv) .. ' this library did not write'
    end
    if f.mv_dead then
      local why = wrong_type({pfx .. 'd:' .. f.mv_dead, 'hash', pfx .. 'di:' .. f.mv_dead, 'list'})
      if why then return nil, nil, why end
    end
  end
  return f, llen, nil
end
