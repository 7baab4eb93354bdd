-- List delayed dispatches that are due by the server's clock.
-- KEYS[1] delayed zset  ARGV[1] max count
-- Returns the due members, earliest first.
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now_ms(), 'LIMIT', 0, tonumber(ARGV[1]))
