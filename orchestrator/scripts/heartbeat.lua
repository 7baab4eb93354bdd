-- Record that a worker is alive, with the server's clock.
-- KEYS[1] workers zset  KEYS[2] worker info hash
-- ARGV[1] worker id  ARGV[2] info TTL ms  ARGV[3..] info field, value pairs
-- Returns the server time in ms.
local now = now_ms()
redis.call('ZADD', KEYS[1], now, ARGV[1])
for i = 3, #ARGV, 2 do
  redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
end
redis.call('HSET', KEYS[2], 'last_ms', now)
redis.call('PEXPIRE', KEYS[2], ARGV[2])
return now
