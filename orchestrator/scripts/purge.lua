-- Delete a finished run older than a cut-off, with everything it stored.
-- KEYS[1] run  KEYS[2] state  KEYS[3] results  KEYS[4] stash  KEYS[5] history  KEYS[6] signals
-- KEYS[7] children  KEYS[8] the index it was found in (done or dead)  KEYS[9] output
-- ARGV[1] run id  ARGV[2] cut-off ms (finished at or before)  ARGV[3] statuses to delete,
-- comma-separated  ARGV[4] statuses that belong in this index, comma-separated
-- Returns 1 when purged, 0 when kept, -1 when the run does not belong in the index any more
-- (it is gone, or was retried): then only its index entry is removed.
local function set(csv)
  local out = {}
  for s in string.gmatch(csv, '[^,]+') do out[s] = true end
  return out
end
local r = redis.call('HMGET', KEYS[1], 'status', 'finished_ms')
if not r[1] or not set(ARGV[4])[r[1]] then
  redis.call('ZREM', KEYS[8], ARGV[1])
  return -1
end
if not set(ARGV[3])[r[1]] then return 0 end
if r[2] and tonumber(r[2]) > tonumber(ARGV[2]) then return 0 end
redis.call('UNLINK', KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[9])  -- freed off the main thread
redis.call('ZREM', KEYS[8], ARGV[1])
return 1
