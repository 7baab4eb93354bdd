-- Delete a finished run older than the retention cut-off (completed or cancelled runs only;
-- failed runs stay in the dead-letter set until retried or purged by hand).
-- KEYS[1] run  KEYS[2] state  KEYS[3] results  KEYS[4] stash  KEYS[5] history  KEYS[6] lease
-- KEYS[7] done
-- ARGV[1] run id  ARGV[2] cut-off ms (finished at or before)
-- Returns 1 when purged, 0 when kept.
local r = redis.call('HMGET', KEYS[1], 'status', 'finished_ms')
if r[1] and r[1] ~= 'completed' and r[1] ~= 'cancelled' then
  redis.call('ZREM', KEYS[7], ARGV[1])
  return 0
end
if r[2] and tonumber(r[2]) > tonumber(ARGV[2]) then return 0 end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6])
redis.call('ZREM', KEYS[7], ARGV[1])
return 1
