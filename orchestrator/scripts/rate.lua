-- A fleet-wide rate limit: GCRA (a leaky bucket as a meter) on the Redis clock, one key per
-- limit (its own slot). `tat` is the theoretical arrival time: a request of cost c fits now
-- when max(tat, now) + c * T - now <= burst * T (T = per_ms / rate, the time one unit takes),
-- which bounds what is let through in any window of t ms to burst + t / T units.
-- A request that does not fit reserves the first moment it fits: `tat` moves on by its cost as
-- if it were let through then, and the run is told how long to wait; when it comes back (at or
-- after that moment) its reservation is its grant. So the reserved moments keep the bound
-- exactly, waiting runs go in the order they asked, and a crowd that waits does not come back
-- at once. A run that comes back late (it waits in its queue's delayed set, which workers
-- promote every promote_interval_s) starts at its first chance after its moment: the starts
-- themselves keep the bound give or take that lateness (README, docs/design.md). A stricter
-- check at the late return (a second meter of starts let through) was measured: it keeps the
-- bound for the starts but sends the late ones back again and again, one start per promote
-- pass (0.18x of the limit end to end, docs/benchmarks.md), so it is not used.
-- KEYS[1] the limit's hash (tat; rate, per_ms, burst when set at run time: they win)
-- KEYS[2] its reservations (zset: run id -> the ms from which it may go)
-- ARGV[1] 'admit' (a step wants to start) | 'spend' (a step reports units it used: tokens)
-- ARGV[2] run id (admit)  ARGV[3] cost (units; 0 admits while the debt is under one burst)
-- ARGV[4] rate, ARGV[5] per ms, ARGV[6] burst: the workflow's definition (used when not set)
-- Returns {'OK', 0} (go now) | {'WAIT', ms} (reserved: come back in ms) |
--   {'SPENT', ms of debt now} | {'INVALID', reason}
-- Races: every caller is one script on the limit's slot, so two workers admitting at once are
-- ordered by Redis; a resent admit whose reply was lost finds its reservation (the same wait)
-- or, when it was granted, asks again (a second unit charged: at most one per lost reply);
-- reservations of runs that never came back (cancelled, failed) lapse after an hour.
local STALE_MS = 3600000
local cfg = redis.call('HMGET', KEYS[1], 'tat', 'rate', 'per_ms', 'burst')
local rate = tonumber(cfg[2]) or tonumber(ARGV[4])
local per = tonumber(cfg[3]) or tonumber(ARGV[5])
local burst = tonumber(cfg[4]) or tonumber(ARGV[6])
local cost = tonumber(ARGV[3])
if not finite(rate) or rate <= 0 or not finite(per) or per <= 0 or not finite(burst) or burst < 1 then
  return {'INVALID', 'rate ' .. tostring(rate) .. ' per ' .. tostring(per) .. ' ms, burst ' .. tostring(burst) ..
    ': expected a rate and a period above 0 and a burst of at least 1'}
end
if not finite(cost) or cost < 0 then return {'INVALID', 'cost ' .. ARGV[3] .. ' is not a number >= 0'} end
local now = now_ms()
local unit = per / rate
local tat = math.max(tonumber(cfg[1]) or 0, now)
if ARGV[1] == 'spend' then
  tat = tat + cost * unit
  redis.call('HSET', KEYS[1], 'tat', string.format('%.3f', tat))
  return {'SPENT', math.ceil(tat - now)}
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - STALE_MS)
local reserved = tonumber(redis.call('ZSCORE', KEYS[2], ARGV[2]))
if reserved then
  if now >= reserved then
    redis.call('ZREM', KEYS[2], ARGV[2])
    return {'OK', 0}
  end
  return {'WAIT', math.ceil(reserved - now)}
end
local fits_at = tat + cost * unit - burst * unit  -- the first moment this request fits
redis.call('HSET', KEYS[1], 'tat', string.format('%.3f', tat + cost * unit))
if fits_at <= now then return {'OK', 0} end
redis.call('ZADD', KEYS[2], string.format('%.3f', fits_at), ARGV[2])
return {'WAIT', math.ceil(fits_at - now)}
