#!lua flags=allow-oom
-- allow-oom: only deletes dead letters; frees memory
-- purge.lua: delete dead letters for good.
--
-- KEYS[1] dead  pfx.."dead"
-- KEYS[2] guard pfx.."guard": never written, so no script of a migrating slot runs
-- ARGV[1] pfx
-- ARGV[2..] ids  dead-letter ids to delete (callers send bounded chunks)
-- Derived keys: pfx.."d:"..id, pfx.."di:"..id.
-- Reply: number of dead letters deleted; {'corrupt', what} when the dead-letter index holds
-- something else (nothing deleted)
--- @include "wrong_type"

local dead, pfx = KEYS[1], ARGV[1]
local why = wrong_type({dead, 'zset'})
if why then
  return {'corrupt', why}
end
local n = 0
for i = 2, #ARGV do
  local id = ARGV[i]
  n = n + redis.call('ZREM', dead, id)
  redis.call('UNLINK', pfx .. 'd:' .. id, pfx .. 'di:' .. id)
end
return n
