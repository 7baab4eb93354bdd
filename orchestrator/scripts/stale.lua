-- List members of a sorted set scored by server-time ms that are older than an age.
-- KEYS[1] zset  ARGV[1] age ms  ARGV[2] max count
-- Returns {server now ms, member, score, member, score, ...}, oldest first.
local now = now_ms()
local out = {now}
local rows = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[1]), 'WITHSCORES', 'LIMIT', 0,
  tonumber(ARGV[2]))
for i = 1, #rows do table.insert(out, rows[i]) end
return out
