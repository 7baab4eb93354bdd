-- A worker's heartbeat in one partition: its claims there stay live for another lease, and it
-- learns which runs were cancelled since its last beat (a running step of theirs must stop).
-- One call per partition per beat, whatever the number of steps the worker holds.
-- KEYS[1] the partition's alive hash  KEYS[2] the partition's cancels stream
-- ARGV[1] worker id  ARGV[2] lease ms  ARGV[3] last cancels entry seen ('' at the first beat)
-- Returns {was live 0|1, last cancels entry id, cancelled run id, ...}. 0: the worker's
-- deadline had passed or was not there (its first beat, Redis lost it, or the supervisor reaped
-- the worker): claims it made before may have been handed to others, so it must let them go;
-- its claims from now on are live again.
local now = now_ms()
local was = live(KEYS[1], ARGV[1], now) and 1 or 0
redis.call('HSET', KEYS[1], ARGV[1], string.format('%d', now + tonumber(ARGV[2])))
local out = {was}
if ARGV[3] == '' then
  local last = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)[1]
  out[2] = last and last[1] or '0-0'
  return out
end
out[2] = ARGV[3]
for _, e in ipairs(redis.call('XRANGE', KEYS[2], '(' .. ARGV[3], '+', 'COUNT', 1000)) do
  out[2] = e[1]
  out[#out + 1] = e[2][2]
end
return out
