-- Re-enqueue a pending entry whose claim is not live, or drop it when it no longer matters.
-- Called by the supervisor for the entries of workers whose deadline passed (dead_pending.lua),
-- and by a worker for an entry pending for it that it is not running (it lost track of it:
-- a reply lost with its connection, a failed ack); XACK decides races: of two callers, one wins.
-- Only the entry that carries the run's current dispatch is re-enqueued: any other one is a
-- duplicate, or a retry's old entry whose backoff must not be skipped. A run that moved on from
-- its current dispatch is held: its steps were chained on that entry by its worker's commits
-- (commit.lua), and what is re-enqueued is the run's current step, not the entry's.
-- KEYS[1] run  KEYS[2] alive  KEYS[3] results  KEYS[4] stream  KEYS[5] history  KEYS[6] stats
-- KEYS[7] queued  KEYS[8] active
-- ARGV[1] group  ARGV[2] entry id  ARGV[3] run id  ARGV[4] step  ARGV[5] visit
-- ARGV[6] idempotency key  ARGV[7] consumer that holds the entry
-- ARGV[8] the worker giving up the entry ('' from the supervisor): a claim of its own is not
-- live (it does not run the step). A re-dispatched claim's worker is named '' in the run (and
-- kept as `dead_worker`, for the crash event the next claim writes).
-- ARGV[9] why, for the event ('' or absent: the supervisor's or the worker's usual words; a
-- worker whose RQ work-horse died says so: orchestrator/bridge/watch.py)
-- Returns {'REDISPATCHED', new entry id} | {'ALIVE'} | {'DROPPED', reason} | {'GONE'}
local function drop(reason)
  if redis.call('XACK', KEYS[4], ARGV[1], ARGV[2]) == 0 then return {'GONE'} end
  redis.call('XDEL', KEYS[4], ARGV[2])
  count(KEYS[6], 'dropped_entries')
  return {'DROPPED', reason}
end
local r = redis.call('HMGET', KEYS[1], 'status', 'step', 'visit', 'dispatch', 'wf', 'claim', 'claim_worker')
if not r[1] then return drop('missing_run') end
if TERMINAL[r[1]] then return drop('terminal') end
local held = r[4] == ARGV[2] and (r[2] ~= ARGV[4] or r[3] ~= ARGV[5])
-- (a held run's current step has no result: its commit would have moved the run on)
if not held and redis.call('HEXISTS', KEYS[3], ARGV[6]) == 1 then return drop('committed') end
if not held and (r[2] ~= ARGV[4] or r[3] ~= ARGV[5]) then return drop('stale') end
if r[4] ~= ARGV[2] then return drop('not the current dispatch') end
local now = now_ms()
local claimed = r[6] and r[6] ~= ''
if claimed and r[7] ~= ARGV[8] and live(KEYS[2], r[7], now) then return {'ALIVE'} end
if redis.call('XACK', KEYS[4], ARGV[1], ARGV[2]) == 0 then return {'GONE'} end
redis.call('XDEL', KEYS[4], ARGV[2])
local id = redis.call('XADD', KEYS[4], '*', 'run', ARGV[3], 'wf', r[5], 'step', r[2], 'visit', r[3])
redis.call('HSET', KEYS[1], 'dispatch', id, 'updated_ms', now)
-- the claim is dead from here on, even if its worker's heartbeat comes back: the next claim
-- counts a crash instead of waiting for it
if claimed then redis.call('HSET', KEYS[1], 'claim_worker', '', 'dead_worker', r[7]) end
index_queued(KEYS[8], KEYS[7], ARGV[3], id)
local what = held and ('step held on entry ' .. ARGV[2]) or ('entry ' .. ARGV[2])
local why = ARGV[8] == '' and (what .. ' of ' .. ARGV[7] .. ', whose heartbeat stopped')
  or (what .. ' given up by ' .. ARGV[8] .. ', which was not running it')
if ARGV[9] and ARGV[9] ~= '' then why = what .. ' given up by ' .. ARGV[8] .. ': ' .. ARGV[9] end
redis.call('RPUSH', KEYS[5], event({type = 'redispatched', at = now, step = r[2], visit = tonumber(r[3]),
  detail = why}))
count(KEYS[6], 'redispatched')
return {'REDISPATCHED', id}
