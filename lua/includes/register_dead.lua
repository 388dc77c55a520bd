-- register_dead.lua: record a dead letter whose items are in pfx.."di:"..id already (`count`
-- of them). f: {tries, deaths, flush_id, created_at} of the sequence; dead: {ttl, max}
-- (prune_dead).
--- @include "int"
--- @include "prune_dead"

local function register_dead(pfx, id, base, seq, count, reason, err, f, now, dead)
  local dmeta = pfx .. 'd:' .. id
  redis.call('HSET', dmeta, 'batch_id', base, 'sequence', seq, 'count', count,
    'reason', reason, 'error', err or '', 'attempts', f.tries or 0, 'deaths', f.deaths or 0,
    'flush_id', f.flush_id or '', 'created_at', f.created_at or '', 'dead_at', int(now))
  redis.call('ZADD', pfx .. 'dead', int(now), id)
  if dead.ttl > 0 then
    redis.call('PEXPIRE', dmeta, dead.ttl)
    redis.call('PEXPIRE', pfx .. 'di:' .. id, dead.ttl)
  end
  prune_dead(pfx, dead, now)
end
