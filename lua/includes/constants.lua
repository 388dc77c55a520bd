-- constants.lua: the constants that several files use. (What is here runs on every call of each
-- script that includes it: no tables.)

-- Items a call moves at most (move jobs, move_step.lua): each costs a few hundred ns of server
-- time.
local MOVE_BUDGET = 10000
-- How long a wake-up token (pfx.."woke") lives when no worker takes it (wake_workers.lua).
local WAKE_HOLD_MS = 100
