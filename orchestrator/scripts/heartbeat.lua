-- Record that a worker is alive, with the server's clock, and that its queues are in use (so a
-- queues set lost with Redis' data comes back and the supervisor scans those queues again).
-- KEYS[1] workers zset  KEYS[2] worker info hash  KEYS[3] queues set
-- ARGV[1] worker id  ARGV[2] info TTL ms  ARGV[3] queue names, comma-separated
-- ARGV[4..] info field, value pairs
-- Returns the server time in ms.
local now = now_ms()
redis.call('ZADD', KEYS[1], now, ARGV[1])
for i = 4, #ARGV, 2 do
  redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
end
redis.call('HSET', KEYS[2], 'last_ms', now)
redis.call('PEXPIRE', KEYS[2], ARGV[2])
for queue in string.gmatch(ARGV[3], '[^,]+') do
  redis.call('SADD', KEYS[3], queue)
end
return now
