-- Acknowledge and delete stream entries, but only those still pending for this consumer: an
-- entry the supervisor re-dispatched (or, after Redis lost writes, one delivered again to
-- another worker) is not this worker's to ack any more.
-- KEYS[1] stream  ARGV[1] group  ARGV[2] consumer  ARGV[3..] entry ids
-- Returns how many entries were acked (0 when the stream or its group is gone: nothing is
-- pending then, and the supervisor recreates the group).
local acked = 0
for i = 3, #ARGV do
  local pending = redis.pcall('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1, ARGV[2])
  if pending.err then return acked end
  if #pending > 0 then
    redis.call('XACK', KEYS[1], ARGV[1], ARGV[i])
    redis.call('XDEL', KEYS[1], ARGV[i])
    acked = acked + 1
  end
end
return acked
