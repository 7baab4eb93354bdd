-- Extend a claim's lease, only if the claim is still the live one.
-- KEYS[1] lease  ARGV[1] claim token  ARGV[2] lease ms
-- Returns 1 when renewed, 0 when the claim is gone (fenced, cancelled, expired, or forgotten by
-- a Redis that lost writes: claim tokens are unique per claim).
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
