-- The namespace's partition count: recorded by the first process that uses the namespace, then
-- compared by every process at start (a run's keys are found from its id and this count, so two
-- counts in one namespace would each miss the other's runs).
-- KEYS[1] fleet config hash  ARGV[1] this process's partition count
-- Returns the namespace's count (ARGV[1] when this call recorded it).
local recorded = redis.call('HMGET', KEYS[1], 'partitions')[1]
if recorded then return tonumber(recorded) end
redis.call('HSET', KEYS[1], 'partitions', ARGV[1])
return tonumber(ARGV[1])
