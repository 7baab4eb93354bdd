-- Re-drive a failed (dead-lettered or quarantined) run from the step that failed. The step
-- keeps its visit, so its idempotency key is the same as in the failed attempts.
-- A run that failed while it waited for a signal (its deadline passed) waits again, its timeout
-- (if it had one) as long as before, counted from now: the step after the wait must not run
-- without the signal it waits for.
-- A run that failed while it waited for child runs (one failed, or its deadline passed) waits
-- for them again: the results of the children that failed or were cancelled are dropped, and
-- the caller re-drives those children (Client.retry: they are in other slots).
-- KEYS[1] run  KEYS[2] history  KEYS[3] stream  KEYS[4] queued  KEYS[5] active  KEYS[6] dead
-- KEYS[7] stats  KEYS[8] stats detail  KEYS[9] delayed  KEYS[10] deadlines
-- KEYS[11] children  KEYS[12] done (where a cancelled run is indexed)
-- The run's own deadline is dropped (a retried run has none); its step's deadline, if it has
-- one, counts again from the retry.
-- ARGV[1] run id  ARGV[2] reason  ARGV[3] request id (a resent call reports RETRIED again and
-- does not re-drive the run a second time)  ARGV[4] '1': a cancelled run is re-driven too (a
-- parent's retry re-drives its children that failed or were cancelled: a map's failed item
-- cancels the others)
-- Returns {'RETRIED', entry id ('signal' or 'children' when the run waits again), step, visit,
--   the failed children to re-drive...} |
--   {'NOT_FAILED', status} | {'MISSING'}
local r = redis.call('HMGET', KEYS[1], 'status', 'wf', 'step', 'visit', 'retry_req', 'dispatch', 'wait_signal',
  'wait_ms', 'due_ms')
if not r[1] then return {'MISSING'} end
if r[5] == ARGV[3] then return {'RETRIED', r[6] or '', r[3], tonumber(r[4])} end
if r[1] ~= 'failed' and not (r[1] == 'cancelled' and ARGV[4] == '1') then return {'NOT_FAILED', r[1]} end
local now = now_ms()
local id = 'signal'
local parked = redis.call('HMGET', KEYS[11], 'n', 'step', 'visit', 'settled')
local rerun = {}
if parked[1] and not parked[4] and parked[2] == r[3] and parked[3] == r[4] then
  id = 'children'
  for i = 0, tonumber(parked[1]) - 1 do
    local outcome = redis.call('HGET', KEYS[11], 's:' .. i)
    if outcome and outcome ~= 'completed' then
      rerun[#rerun + 1] = redis.call('HGET', KEYS[11], 'c:' .. i)
      redis.call('HDEL', KEYS[11], 'r:' .. i, 's:' .. i)
      redis.call('HINCRBY', KEYS[11], 'done', -1)
    end
  end
  redis.call('HSET', KEYS[1], 'status', 'waiting')
  redis.call('HDEL', KEYS[1], 'children_failed')
  index_active(KEYS[5], KEYS[4], ARGV[1], now)  -- the sweep checks the children at once
elseif r[7] and r[7] ~= '' then
  local timeout = (tonumber(r[9]) or 0) > 0 and tonumber(r[9]) - (tonumber(r[8]) or 0) or 0
  local due = timeout > 0 and now + timeout or 0
  if due > 0 then redis.call('ZADD', KEYS[9], due, ARGV[1]) end
  redis.call('HSET', KEYS[1], 'status', 'waiting', 'wait_ms', now, 'due_ms', due)
  index_active(KEYS[5], KEYS[4], ARGV[1], due > 0 and due or now + WAIT_LOOK_MS)
else
  id = redis.call('XADD', KEYS[3], '*', 'run', ARGV[1], 'wf', r[2], 'step', r[3], 'visit', r[4])
  redis.call('HSET', KEYS[1], 'status', 'running')
  index_queued(KEYS[5], KEYS[4], ARGV[1], id)
end
redis.call('HSET', KEYS[1], 'errors', 0, 'crashes', 0, 'claim', '', 'claim_fence', 0,
  'dispatch', id, 'updated_ms', now, 'retry_req', ARGV[3])
redis.call('HDEL', KEYS[1], 'error', 'finished_ms', 'deadline_ms')
redis.call('ZREM', KEYS[6], ARGV[1])
if r[1] == 'cancelled' then redis.call('ZREM', KEYS[12], ARGV[1]) end
redis.call('ZREM', KEYS[10], ARGV[1])
if id ~= 'signal' and id ~= 'children' then step_queued(KEYS[10], KEYS[1], ARGV[1], r[3], now) end
redis.call('RPUSH', KEYS[2], event({type = 'retried', at = now, step = r[3], visit = tonumber(r[4]),
  detail = ARGV[2]}))
count(KEYS[7], 'runs_retried')
detail(KEYS[8], 1, 'runs', r[2], 'retried')
return {'RETRIED', id, r[3], tonumber(r[4]), unpack(rerun)}
