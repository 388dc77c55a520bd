#!lua flags=allow-oom
-- allow-oom: only deletes keys and fields (a head counter rewritten); frees memory
-- delete.lua: delete a base id (head, history, empty sequences) or one sequence "base::N".
-- Refuses while a sequence is flushing or holds pending items, so no item is ever dropped.
--
-- KEYS[1] head     pfx.."b:"..base
-- KEYS[2] history  pfx.."h:"..base
-- KEYS[3] ids      pfx.."ids"
-- KEYS[4] due      pfx.."due"
-- KEYS[5] guard    pfx.."guard": never written, so no script of a migrating slot runs
-- ARGV[1] pfx
-- ARGV[2] base
-- ARGV[3] seq        sequence number, or '' for the whole base id
-- ARGV[4] retention  seconds to keep head/history when a single sequence is deleted
-- Derived keys: state and items of the sequences concerned (pfx.."o:"..base for an accumulating one).
-- Reply: {deleted (0|1), reason ('' when deleted)}; {-1, what} when the keys hold something
-- else (nothing deleted)
--- @include "member_of"
--- @include "wrong_type"
--- @include "head_problem"
--- @include "seq_problem"
--- @include "open_items_of"
--- @include "retire"

local head, hist, ids, due = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local pfx, base, want = ARGV[1], ARGV[2], ARGV[3]
local why = head_problem(head) or wrong_type({ids, 'set', due, 'zset', pfx .. 'o:' .. base, 'list'})
if why then
  return {-1, why}
end
if redis.call('EXISTS', head) == 0 then
  return {0, 'Batch not found'}
end
local acc = redis.call('HGET', head, 'acc')

-- reason this sequence must not be deleted, or nil
local function blocker(seq)
  local member = member_of(base, seq)
  local status = redis.call('HGET', pfx .. 's:' .. member, 'status')
  if status == 'flushing' then
    return 'Cannot delete batch while flushing'
  end
  if redis.call('LLEN', pfx .. 'i:' .. member) > 0 or (status == 'accumulating'
      and open_items_of(pfx, base, seq, acc) > 0) then
    return 'Cannot delete batch with pending items'
  end
  return nil
end

local function drop(seq)
  local member = member_of(base, seq)
  if redis.call('HGET', pfx .. 's:' .. member, 'status') == 'accumulating' then
    local _, okey, how = open_items_of(pfx, base, seq, acc)
    if how == 'own' or how == 'damaged' then
      redis.call('DEL', okey)  -- its open list: a header alone (see blocker)
    end
  end
  redis.call('DEL', pfx .. 's:' .. member, pfx .. 'i:' .. member)
  redis.call('ZREM', due, member)
end

if want == '' then
  local fields = redis.call('HGETALL', head)
  local active = {}
  for i = 1, #fields, 2 do
    local seq = string.match(fields[i], '^a:(%d+)$')
    if seq then
      why = seq_problem(pfx, member_of(base, seq))
      if why then return {-1, why} end
      why = blocker(seq)
      if why then return {0, why} end
      table.insert(active, seq)
    end
  end
  for _, seq in ipairs(active) do drop(seq) end
  redis.call('DEL', head, hist)
  redis.call('SREM', ids, base)
  return {1, ''}
end

if redis.call('HEXISTS', head, 'a:' .. want) == 1 then
  why = seq_problem(pfx, member_of(base, want))
  if why then return {-1, why} end
  why = blocker(want)
  if why then return {0, why} end
  drop(want)
  retire(pfx, head, ids, base, want, tonumber(ARGV[4]))
  return {1, ''}
end
if redis.call('HGET', head, 'done_seq') == want then
  redis.call('HDEL', head, 'done_seq', 'done_items', 'done_at', 'done_created')
  return {1, ''}
end
return {0, 'Batch not found'}
