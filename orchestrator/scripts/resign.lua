-- Give up the supervisor leader lease, only if this candidate still holds it (a lease that ran
-- out and was taken by another supervisor must not be deleted).
-- KEYS[1] leader key  ARGV[1] candidate id
-- Returns 1 when the lease was released, 0 when someone else holds it (or nobody).
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
