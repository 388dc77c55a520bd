-- next_free_seq.lua: the next sequence number of a base id (HINCRBY of the head's next). A
-- number whose keys exist already (left by something else) is skipped, never written over.
--- @include "member_of"

local function next_free_seq(pfx, head, base)
  local seq = redis.call('HINCRBY', head, 'next', 1) - 1
  local tries = 0
  while redis.call('EXISTS', pfx .. 's:' .. member_of(base, seq), pfx .. 'i:' .. member_of(base, seq)) > 0
      and tries < 100 do
    seq = redis.call('HINCRBY', head, 'next', 1) - 1
    tries = tries + 1
  end
  return seq
end
