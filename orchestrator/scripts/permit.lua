-- A fleet-wide concurrency limit: at most `limit` steps hold a permit of key K at once, across
-- every worker. All of K's keys share K's own slot, so each call is one atomic script.
-- A permit is held by a run (a step, or a map item: each item is a run) under the claim token
-- of the attempt that took it, with a lease (server ms) that the holder's worker renews at every
-- heartbeat: a worker killed with kill -9 stops renewing, and its permits return when their
-- lease ends. A step that may not have one yet joins the waiting line (FIFO by the moment it
-- first asked) and is given back to its queue's delayed set (defer.lua) holding no worker slot;
-- a release or the supervisor's sweep names the first waiters that now fit, and they are woken
-- (promote.lua with the limit's name). A permit that frees up is kept for the waiters ahead:
-- a step that asks while others wait gets one only when more permits are free than runs wait,
-- so a newcomer never jumps the line.
-- KEYS[1] holders (zset: run id -> lease end ms)  KEYS[2] waiting (zset: run id -> ms it first
-- asked)  KEYS[3] seen (zset: waiting run id -> ms it last asked)  KEYS[4] hash: 'limit' (set
-- at run time: wins over the code's), 'code_limit' (the code's, as the workers announce it),
-- 'o:<run>' the holding claim's token, 'f:<run>' its fence, 'q:<run>' a waiting run's queue
-- ARGV[1] mode  ARGV[2] the caller's code's limit, used when none is set at run time ('': the
--   announced code_limit; the supervisor runs no workflow code)
--   acquire: ARGV[3] run  ARGV[4] claim token  ARGV[5] fence  ARGV[6] lease ms  ARGV[7] queue
--            ARGV[8] ms after which a waiter that stopped asking leaves the line
--     -> {'OK', ms waited, held} | {'WAIT', runs ahead, held, limit} | {'FENCED'} (a newer claim of
--        the run holds it) | {'INVALID', reason}
--   release: ARGV[3] run  ARGV[4] claim token -> {1 | 0 (not held by that claim), queue, run, ...}
--   renew:   ARGV[3] lease ms  ARGV[4..] run, claim token pairs -> the runs whose permit that
--            claim no longer holds (its lease ended, or a newer claim took it): they must stop
--   sweep:   ARGV[3] stale ms -> {lapsed holders dropped, queue, run, ...}
--   forget:  ARGV[3] run (a waiter whose run ended) -> 1 | 0
--   (queue, run, ...: the first waiters that fit now, to wake)
-- Races (docs/design.md): every caller is one script on K's slot, so holders and waiters change
-- in one order. Two workers acquiring the last permit: one gets it, the other waits. A resent
-- acquire whose reply was lost finds its claim holding (OK again, nothing counted twice) or its
-- place in line. The supervisor re-dispatched a step whose holder died: the new claim (higher
-- fence) takes the permit over, and the old attempt's late release, renew or acquire is refused
-- by the token and fence. A release that names waiters to wake and dies before waking them: the
-- sweep names them again. A waiter cancelled meanwhile: its wake answers GONE and the waker
-- forgets it; one that stops asking otherwise leaves after ARGV[8] ms. Redis restarted from an
-- older copy: the holders it forgot no longer count (their renewals find no entry), so until
-- they end at most that many more steps hold permits than the limit; the waiters it forgot ask
-- again at their next poll and join the line anew.
local mode = ARGV[1]
local setting = redis.call('HMGET', KEYS[4], 'limit', 'code_limit')
local raw = setting[1] or (ARGV[2] ~= '' and ARGV[2]) or setting[2]
local limit = tonumber(raw)
if not finite(limit) or limit < 1 or limit ~= math.floor(limit) then
  return {'INVALID', 'limit ' .. tostring(raw) .. ': expected a whole number of permits >= 1'}
end
local now = now_ms()

-- drop the holders whose lease ended (their worker stopped renewing: dead or cut off) and the
-- waiters that stopped asking
local function tidy(stale_ms)
  local lapsed = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
  for _, run in ipairs(lapsed) do redis.call('HDEL', KEYS[4], 'o:' .. run, 'f:' .. run) end
  if #lapsed > 0 then redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now) end
  if stale_ms then
    for _, run in ipairs(redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now - stale_ms)) do
      redis.call('ZREM', KEYS[2], run)
      redis.call('ZREM', KEYS[3], run)
      redis.call('HDEL', KEYS[4], 'q:' .. run)
    end
  end
  return #lapsed
end

-- the first waiters that fit in the free permits: queue, run pairs
local function wakeable(out)
  local free = limit - redis.call('ZCARD', KEYS[1])
  if free <= 0 then return out end
  for _, run in ipairs(redis.call('ZRANGE', KEYS[2], 0, free - 1)) do
    table.insert(out, redis.call('HGET', KEYS[4], 'q:' .. run) or '')
    table.insert(out, run)
  end
  return out
end

local function hold(run, token, fence, lease_ms)
  redis.call('ZADD', KEYS[1], now + lease_ms, run)
  redis.call('HSET', KEYS[4], 'o:' .. run, token, 'f:' .. run, fence)
end

local function leave_line(run)
  redis.call('ZREM', KEYS[2], run)
  redis.call('ZREM', KEYS[3], run)
  redis.call('HDEL', KEYS[4], 'q:' .. run)
end

if mode == 'acquire' then
  local run, token, fence, lease_ms, stale_ms = ARGV[3], ARGV[4], tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[8])
  if not fence or not lease_ms or lease_ms <= 0 or not stale_ms then
    return {'INVALID', 'fence, lease and stale ms must be numbers'}
  end
  tidy(stale_ms)
  if redis.call('ZSCORE', KEYS[1], run) then
    local owner = redis.call('HMGET', KEYS[4], 'o:' .. run, 'f:' .. run)
    if owner[1] ~= token and (tonumber(owner[2]) or 0) > fence then return {'FENCED'} end
    -- this claim's resent call, or a newer claim of the run whose holder died: it holds on
    hold(run, token, fence, lease_ms)
    return {'OK', 0, redis.call('ZCARD', KEYS[1])}
  end
  local held = redis.call('ZCARD', KEYS[1])
  local free = limit - held
  local first = tonumber(redis.call('ZSCORE', KEYS[2], run))
  local ahead = first and redis.call('ZRANK', KEYS[2], run) or redis.call('ZCARD', KEYS[2])
  if ahead < free then
    if first then leave_line(run) end
    hold(run, token, fence, lease_ms)
    return {'OK', first and math.max(0, now - first) or 0, held + 1}
  end
  if not first then redis.call('ZADD', KEYS[2], now, run) end
  redis.call('ZADD', KEYS[3], now, run)
  redis.call('HSET', KEYS[4], 'q:' .. run, ARGV[7])
  return {'WAIT', ahead, held, limit}
elseif mode == 'release' then
  local run = ARGV[3]
  local released = 0
  if redis.call('HGET', KEYS[4], 'o:' .. run) == ARGV[4] then
    redis.call('ZREM', KEYS[1], run)
    redis.call('HDEL', KEYS[4], 'o:' .. run, 'f:' .. run)
    released = 1
  end
  tidy(nil)
  return wakeable({released})
elseif mode == 'renew' then
  local lease_ms = tonumber(ARGV[3])
  if not lease_ms or lease_ms <= 0 then return {'INVALID', 'lease ' .. ARGV[3] .. ' is not a number of ms'} end
  tidy(nil)
  local lost = {}
  for i = 4, #ARGV - 1, 2 do
    if redis.call('HGET', KEYS[4], 'o:' .. ARGV[i]) == ARGV[i + 1] then
      redis.call('ZADD', KEYS[1], now + lease_ms, ARGV[i])
    else
      table.insert(lost, ARGV[i])
    end
  end
  return lost
elseif mode == 'sweep' then
  local stale_ms = tonumber(ARGV[3])
  if not stale_ms then return {'INVALID', 'stale ' .. tostring(ARGV[3]) .. ' is not a number of ms'} end
  return wakeable({tidy(stale_ms)})
elseif mode == 'forget' then
  local waiting = redis.call('ZSCORE', KEYS[2], ARGV[3]) and 1 or 0
  leave_line(ARGV[3])
  return waiting
end
return {'INVALID', 'mode ' .. tostring(mode) .. ': expected acquire, release, renew, sweep or forget'}
