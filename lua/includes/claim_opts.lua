-- claim_opts.lua: claim_due's options from ARGV[i..i+12] (claim.lua's ARGV[2..14]; ack.lua's
-- optional ARGV[9..21]).

local function claim_opts(i)
  return {limit = tonumber(ARGV[i]), lease = tonumber(ARGV[i + 1]), owner = ARGV[i + 2],
    seed = ARGV[i + 3], max_deaths = tonumber(ARGV[i + 6]), bisect = ARGV[i + 7] == '1',
    cap = tonumber(ARGV[i + 9]), inline_max = tonumber(ARGV[i + 10] or '0'),
    dead = {ttl = tonumber(ARGV[i + 11] or '0'), max = tonumber(ARGV[i + 12] or '0')},
    cfg = {retention = tonumber(ARGV[i + 4]), max = tonumber(ARGV[i + 5]), ordered = ARGV[i + 8] == '1'}}
end
