-- Fail a run whose deadline has passed: the supervisor calls it for each run that due.lua lists
-- from its partition's deadlines zset. As with cancel.lua, a step still running learns it at its
-- worker's next beat (the run id goes on the partition's cancels stream) and its late commit is
-- refused (TERMINAL); a sleeping or backing-off run loses its wake-up at once.
-- KEYS[1] run  KEYS[2] cancels  KEYS[3] history  KEYS[4] delayed  KEYS[5] queued  KEYS[6] active
-- KEYS[7] dead  KEYS[8] stats  KEYS[9] stats detail  KEYS[10] deadlines
-- ARGV[1] run id
-- Returns {'EXPIRED', deadline ms} | {'NOT_DUE', deadline ms or ''} | {'TERMINAL', status} |
--   {'MISSING'}
-- The deadline is the member's score, read here on this server's clock: a caller that listed the
-- run earlier cannot expire it early. A finished or missing run only leaves the zset.
local r = redis.call('HMGET', KEYS[1], 'status', 'step', 'visit', 'wf', 'created_ms', 'deadline_ms')
if not r[1] then
  redis.call('ZREM', KEYS[10], ARGV[1])
  return {'MISSING'}
end
if TERMINAL[r[1]] then
  redis.call('ZREM', KEYS[10], ARGV[1])
  return {'TERMINAL', r[1]}
end
local now = now_ms()
local deadline = tonumber(redis.call('ZSCORE', KEYS[10], ARGV[1]))
if not deadline or deadline > now then return {'NOT_DUE', deadline or ''} end
local allowed = (tonumber(r[6]) or deadline) - (tonumber(r[5]) or deadline)
local msg = 'the run did not finish within its deadline (' .. string.format('%d', allowed) ..
  ' ms after it was submitted); it was at step ' .. r[2] .. ' (' .. r[1] .. ')'
redis.call('ZREM', KEYS[10], ARGV[1])
redis.call('ZREM', KEYS[4], ARGV[1])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', 1000, '*', 'run', ARGV[1])
redis.call('HSET', KEYS[1], 'status', 'failed', 'claim', '', 'claim_fence', 0, 'dispatch', '',
  'finished_ms', now, 'updated_ms', now,
  'error', event({type = 'DeadlineExceeded', message = msg, traceback = '', retryable = false}))
unindex(KEYS[6], KEYS[5], ARGV[1])
redis.call('ZADD', KEYS[7], now, ARGV[1])
redis.call('RPUSH', KEYS[3], event({type = 'failed', at = now, step = r[2], visit = tonumber(r[3]), detail = msg}))
count(KEYS[8], 'runs_failed')
count(KEYS[8], 'runs_expired')
detail(KEYS[9], 1, 'runs', r[4], 'failed')
return {'EXPIRED', deadline}
