-- Move one due retry or sleeping run from the delayed set onto its queue's stream, or end a
-- wait for a signal at its timeout (the wait's state field set to null, the run on at the
-- wait's on_timeout step). ZREM decides races; the member's own score decides whether it is
-- due, on this server's clock: a caller that listed it as due (due.lua) may come after the run
-- was woken, ran and went to sleep again (or was signalled: signal.lua removes the member).
-- KEYS[1] delayed  KEYS[2] stream  KEYS[3] run  KEYS[4] stats  KEYS[5] queued  KEYS[6] active
-- KEYS[7] history  KEYS[8] state  KEYS[9] deadlines
-- ARGV[1] run id (the delayed set's member)
-- ARGV[2] (optional) a concurrency limit's name: wake the run before its due time if it waits
--   for a permit of that limit (permit.lua named it as one that fits now); never a run that
--   sleeps, backs off or waits for anything else
-- Returns the new entry id, or '' when it is not due, another process promoted it, or the run
-- moved on; 'GONE' (a wake only) when the run ended or is missing: the waker takes it out of
-- the limit's line.
local now = now_ms()
local due = redis.call('ZSCORE', KEYS[1], ARGV[1])
if ARGV[2] then
  local w = redis.call('HMGET', KEYS[3], 'status', 'wait_permit')
  if not w[1] or TERMINAL[w[1]] then return 'GONE' end
  if not due or w[1] ~= 'retrying' or w[2] ~= ARGV[2] then return '' end
elseif not due or tonumber(due) > now then return '' end
redis.call('ZREM', KEYS[1], ARGV[1])
local r = redis.call('HMGET', KEYS[3], 'status', 'step', 'visit', 'wf', 'wait_signal', 'wait_into', 'wait_on_timeout')
if r[1] ~= 'retrying' and r[1] ~= 'sleeping' and r[1] ~= 'waiting' then return '' end
if r[1] == 'waiting' then
  -- timed out: go on at on_timeout (when set), whose visit this is instead of the step's
  if r[7] and r[7] ~= '' and r[7] ~= r[2] then
    redis.call('HINCRBY', KEYS[3], 'v:' .. r[2], -1)
    r[3] = tostring(redis.call('HINCRBY', KEYS[3], 'v:' .. r[7], 1))
    r[2] = r[7]
  end
  if r[6] and r[6] ~= '' then redis.call('HSET', KEYS[8], r[6], 'null') end
  redis.call('HSET', KEYS[3], 'step', r[2], 'visit', r[3], 'wait_signal', '')
  redis.call('RPUSH', KEYS[7], event({type = 'timed_out', at = now, step = r[2], visit = tonumber(r[3]),
    signal = r[5]}))
  count(KEYS[4], 'wait_timeouts')
end
local id = redis.call('XADD', KEYS[2], '*', 'run', ARGV[1], 'wf', r[4], 'step', r[2], 'visit', r[3])
redis.call('HSET', KEYS[3], 'dispatch', id, 'status', 'running', 'updated_ms', now)
redis.call('HDEL', KEYS[3], 'wait_permit')  -- a wake for a permit it no longer waits for finds nothing
if r[1] ~= 'retrying' then step_queued(KEYS[9], KEYS[3], ARGV[1], r[2], now) end  -- a retry keeps its step's
index_queued(KEYS[6], KEYS[5], ARGV[1], id)
count(KEYS[4], 'promoted')
if r[1] == 'sleeping' then
  redis.call('RPUSH', KEYS[7], event({type = 'woke', at = now, step = r[2], visit = tonumber(r[3])}))
  count(KEYS[4], 'woken')
end
return id
