-- fresh_dead_id.lua: a dead-letter id that names no dead letter yet, from `id`.

local function fresh_dead_id(pfx, id)
  local n, out = 0, id
  while redis.call('EXISTS', pfx .. 'd:' .. out, pfx .. 'di:' .. out) > 0 do
    n = n + 1
    out = id .. '~' .. n
  end
  return out
end
