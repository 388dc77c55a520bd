-- quarantine_member.lua: take a due member that cannot be delivered as it is out of the delay
-- queue, into a dead letter with reason 'quarantine' and `why` as its error: with its sealed
-- items where its list is a list, and the facts of its state where that is a hash (the state is
-- then dropped, so no later claim trips over it). Keys of another type stay as they are, for the
-- operator to inspect. Returns the dead letter's id.
--- @include "split_member"
--- @include "key_type"
--- @include "head_problem"
--- @include "parse_header"
--- @include "unpark"
--- @include "retire"
--- @include "fresh_dead_id"
--- @include "register_dead"
--- @include "pending_delta"

local function quarantine_member(pfx, member, why, id, now, cfg, dead)
  local due = pfx .. 'due'
  redis.call('ZREM', due, member)
  local base, seq = split_member(member)
  local meta, ikey = pfx .. 's:' .. member, pfx .. 'i:' .. member
  local f = {}
  local status = nil
  if key_type(meta) == 'hash' then
    local v = redis.call('HMGET', meta, 'status', 'tries', 'deaths', 'flush_id', 'created_at')
    status = v[1]
    f = {tries = v[2], deaths = v[3], flush_id = v[4], created_at = v[5]}
    redis.call('DEL', meta)
  end
  local count = 0
  id = fresh_dead_id(pfx, id)
  if key_type(ikey) == 'list' then
    count = redis.call('LLEN', ikey)
    redis.call('RENAME', ikey, pfx .. 'di:' .. id)
  elseif base and status == 'accumulating' and key_type(pfx .. 'o:' .. base) == 'list' then
    -- an accumulating sequence's items, in its base id's open list behind the header
    local okey = pfx .. 'o:' .. base
    if parse_header(redis.call('LINDEX', okey, 0)) == seq then
      count = redis.call('LLEN', okey) - 1
      redis.call('RENAME', okey, pfx .. 'di:' .. id)
      redis.call('LPOP', pfx .. 'di:' .. id)
    end
  end
  register_dead(pfx, id, base or member, seq or -1, count, 'quarantine', why, f, now, dead)
  if base then
    -- the head stops counting the sequence, where the head can be trusted
    local head = pfx .. 'b:' .. base
    if not head_problem(head) and redis.call('HEXISTS', head, 'a:' .. seq) == 1 then
      if status == 'flushing' and count > 0 then
        pending_delta(pfx, head, -count)
      end
      retire(pfx, head, pfx .. 'ids', base, seq, cfg.retention)
      if cfg.ordered then unpark(pfx, head, due, base, now) end
    end
  end
  return id
end
