-- Save a mid-step checkpoint for the claim that is running the step, and only for it.
-- Also records in the run what step time the stash keeps (`stash_ms`): this attempt's so far
-- (since its claim) plus what the stash it resumed from kept (`stash_base_ms`, set by the
-- claim), so that a crash can count what resuming from it saves (claim.lua).
-- KEYS[1] run  KEYS[2] stash  ARGV[1] claim token  ARGV[2] idempotency key  ARGV[3] snapshot JSON
-- Returns 1 when saved, 0 when this claim is no longer the live one (replaced, cancelled, or
-- forgotten by a Redis that lost writes: claim tokens are unique per claim).
local r = redis.call('HMGET', KEYS[1], 'claim', 'claim_ms', 'stash_base_ms')
if r[1] ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
local kept = math.max(0, now_ms() - (tonumber(r[2]) or 0)) + (tonumber(r[3]) or 0)
redis.call('HSET', KEYS[1], 'stash_ms', string.format('%d', kept))
return 1
