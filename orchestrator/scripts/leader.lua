-- Take or keep the supervisor leader lease (one acting supervisor; the others stand by).
-- KEYS[1] leader key  ARGV[1] candidate id  ARGV[2] lease ms
-- Returns 1 when the candidate holds the lease after this call, 0 otherwise.
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if not holder then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
