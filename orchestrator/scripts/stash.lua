-- Save a mid-step checkpoint for the claim that is running the step, and only for it.
-- KEYS[1] run  KEYS[2] stash  ARGV[1] claim token  ARGV[2] idempotency key  ARGV[3] snapshot JSON
-- Returns 1 when saved, 0 when this claim is no longer the live one (replaced, cancelled, or
-- forgotten by a Redis that lost writes: claim tokens are unique per claim).
if redis.call('HGET', KEYS[1], 'claim') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
return 1
