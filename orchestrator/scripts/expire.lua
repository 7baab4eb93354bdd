-- Fail a run whose deadline has passed, its own (submit's deadline_s) or its current step's (the
-- step's deadline_s, counted from when the step was queued: step_due in _prelude.lua): the
-- supervisor calls it for each run that due.lua lists from its partition's deadlines zset. As
-- with cancel.lua, a step still running learns it at its worker's next beat (the run id goes on
-- the partition's cancels stream) and its late commit is refused (TERMINAL); a sleeping,
-- waiting or backing-off run loses its wake-up at once.
-- KEYS[1] run  KEYS[2] cancels  KEYS[3] history  KEYS[4] delayed  KEYS[5] queued  KEYS[6] active
-- KEYS[7] dead  KEYS[8] stats  KEYS[9] stats detail  KEYS[10] deadlines  KEYS[11] finished
-- ARGV[1] run id
-- Returns {'EXPIRED', deadline ms} | {'NOT_DUE', deadline ms or ''} | {'TERMINAL', status} |
--   {'MISSING'}
-- The member must be there with a score that is due on this server's clock, so a caller that
-- listed the run earlier (before its step moved on, or before a retry dropped its deadline)
-- cannot expire it early.
local r = redis.call('HMGET', KEYS[1], 'status', 'step', 'visit', 'wf', 'created_ms', 'deadline_ms', 'queued_ms')
if not r[1] then
  redis.call('ZREM', KEYS[10], ARGV[1])
  return {'MISSING'}
end
if TERMINAL[r[1]] then
  redis.call('ZREM', KEYS[10], ARGV[1])
  return {'TERMINAL', r[1]}
end
local now = now_ms()
local score = tonumber(redis.call('ZSCORE', KEYS[10], ARGV[1]))
if not score or score > now then return {'NOT_DUE', score or ''} end
-- the score is the earlier of the two deadlines (every script that moves the run's step
-- re-scores it in the same atomic step): the step's when it matches, else the run's own
local step_at = step_due(KEYS[1], r[2], tonumber(r[7]) or 0)
local msg, kind, deadline
if step_at and step_at <= score then
  kind, deadline = 'StepDeadlineExceeded', step_at
  msg = 'step ' .. r[2] .. ' did not commit within its deadline_s (' .. string.format('%d', step_at - tonumber(r[7])) ..
    ' ms from when it was queued; queue wait, attempts and backoffs included); it was ' .. r[1]
elseif r[6] then
  kind, deadline = 'DeadlineExceeded', score
  local allowed = (tonumber(r[6]) or score) - (tonumber(r[5]) or score)
  msg = 'the run did not finish within its deadline (' .. string.format('%d', allowed) ..
    ' ms after it was submitted); it was at step ' .. r[2] .. ' (' .. r[1] .. ')'
else
  -- a member with neither deadline (left from a step the run moved past): put it right
  index_deadlines(KEYS[10], KEYS[1], ARGV[1], r[2], tonumber(r[7]) or 0)
  return {'NOT_DUE', tonumber(redis.call('ZSCORE', KEYS[10], ARGV[1])) or ''}
end
redis.call('ZREM', KEYS[10], ARGV[1])
redis.call('ZREM', KEYS[4], ARGV[1])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', 1000, '*', 'run', ARGV[1])
redis.call('HSET', KEYS[1], 'status', 'failed', 'claim', '', 'claim_fence', 0, 'dispatch', '',
  'finished_ms', now, 'updated_ms', now,
  'error', event({type = kind, message = msg, traceback = '', retryable = false}))
unindex(KEYS[6], KEYS[5], ARGV[1])
redis.call('ZADD', KEYS[7], now, ARGV[1])
redis.call('RPUSH', KEYS[3], event({type = 'failed', at = now, step = r[2], visit = tonumber(r[3]), detail = msg}))
count(KEYS[8], 'runs_failed')
announce(KEYS[11], KEYS[1], ARGV[1])
count(KEYS[8], kind == 'DeadlineExceeded' and 'runs_expired' or 'steps_expired')
detail(KEYS[9], 1, 'runs', r[4], 'failed')
return {'EXPIRED', deadline}
