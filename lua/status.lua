-- status.lua: one consistent snapshot of a base id -- head record plus every active sequence.
--
-- KEYS[1] head  pfx.."b:"..base
-- ARGV[1] pfx
-- ARGV[2] base
-- Derived keys: state and items of each active sequence.
-- Reply: {head_fields, {seq, state_fields, llen}, ...}
--   head_fields   flat HGETALL of the head ({} when the base id is unknown)
--   per active sequence (accumulating or flushing): its number, flat HGETALL, list length
local head = KEYS[1]
local pfx, base = ARGV[1], ARGV[2]
local fields = redis.call('HGETALL', head)
local out = {fields}
for i = 1, #fields, 2 do
  local seq = string.match(fields[i], '^a:(%d+)$')
  if seq then
    local member = member_of(base, seq)
    table.insert(out, {tonumber(seq), redis.call('HGETALL', pfx .. 's:' .. member),
      redis.call('LLEN', pfx .. 'i:' .. member)})
  end
end
return out
