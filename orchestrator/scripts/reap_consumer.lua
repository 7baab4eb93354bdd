-- Remove a worker presumed dead from a consumer group, only if it is still absent from the
-- fleet and has no pending entries (a late XREADGROUP must not lose what it read).
-- KEYS[1] stream  KEYS[2] workers zset  ARGV[1] group  ARGV[2] consumer
-- Returns 1 when the consumer was deleted, 0 when it was kept (or the group is gone).
if redis.call('ZSCORE', KEYS[2], ARGV[2]) then return 0 end
local pending = redis.pcall('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2])
if pending.err or #pending > 0 then return 0 end
redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
return 1
