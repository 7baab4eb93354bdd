-- Remove a worker presumed dead from one stream's consumer group, only if it has no pending
-- entries there (a late XREADGROUP must not lose what it read). The caller checked that the
-- worker is gone from the fleet (a fleet key, in another slot than the stream); a worker that
-- comes back in between loses nothing: its next XREADGROUP makes the consumer again.
-- KEYS[1] stream  ARGV[1] group  ARGV[2] consumer
-- Returns 1 when the consumer was deleted, 0 when it was kept (or the group is gone).
local pending = redis.pcall('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2])
if pending.err or #pending > 0 then return 0 end
redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
return 1
