-- Remove workers whose last heartbeat is older than a lease from the fleet, in one atomic step
-- with reading their heartbeat times: a worker that beats in between is never removed.
-- KEYS[1] workers zset  ARGV[1] age ms (a lease)  ARGV[2] max count
-- Returns {server now ms, worker id, last heartbeat ms, ...} of the removed workers.
local now = now_ms()
local out = {now}
local rows = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[1]), 'WITHSCORES', 'LIMIT', 0,
  tonumber(ARGV[2]))
for i = 1, #rows, 2 do
  redis.call('ZREM', KEYS[1], rows[i])
  table.insert(out, rows[i])
  table.insert(out, rows[i + 1])
end
return out
