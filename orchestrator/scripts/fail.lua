-- Record a failed attempt (the step raised or timed out): schedule a retry after its backoff,
-- or fail the run and dead-letter it. The caller XACKs the stream entry afterwards.
-- KEYS[1] run  KEYS[2] history  KEYS[3] delayed  KEYS[4] queued  KEYS[5] active  KEYS[6] done
-- KEYS[7] dead  KEYS[8] stats  KEYS[9] stats detail  KEYS[10] finished
-- ARGV[1] run id  ARGV[2] claim token  ARGV[3] attempt event body (JSON object, with error)
-- ARGV[4] event type ('error' | 'timeout')  ARGV[5] retry delay ms, '' = fail the run
-- ARGV[6] error JSON
-- A retry that would start at or after its step's deadline (a run with step deadlines:
-- step_due in _prelude.lua) is not scheduled: the run fails with StepDeadlineExceeded.
-- The delayed set's member is the run id (a run waits out at most one backoff at a time); the
-- run is indexed in `active` scored by its due time, so the sweep looks at it only once it is
-- overdue.
-- Returns {'RETRY', due ms} | {'FAILED'} | {'REPLAY'} | {'TERMINAL', status} |
--   {'FENCED', fence of the live claim} | {'MISSING'} | {'INVALID', reason}
local r = redis.call('HMGET', KEYS[1], 'status', 'claim', 'claim_fence', 'done_claim', 'wf', 'step', 'sd', 'queued_ms')
if not r[1] then return {'MISSING'} end
if ARGV[5] ~= '' and not tonumber(ARGV[5]) then return {'INVALID', 'retry delay ' .. ARGV[5] .. ' is not a number'} end
if r[2] ~= ARGV[2] then
  if r[4] == ARGV[2] then return {'REPLAY'} end
  if TERMINAL[r[1]] then return {'TERMINAL', r[1]} end
  local now = now_ms()
  redis.call('HINCRBY', KEYS[1], 'fenced', 1)
  redis.call('RPUSH', KEYS[2], stamp('fenced', ARGV[3], now))
  count(KEYS[8], 'fenced')
  detail(KEYS[9], 1, 'steps', r[5], r[6], 'fenced')
  return {'FENCED', tonumber(r[3])}
end
local now = now_ms()
redis.call('HINCRBY', KEYS[1], 'errors', 1)
redis.call('HSET', KEYS[1], 'claim', '', 'claim_fence', 0, 'done_claim', ARGV[2], 'updated_ms', now)
redis.call('RPUSH', KEYS[2], stamp(ARGV[4], ARGV[3], now))
detail(KEYS[9], 1, 'steps', r[5], r[6], ARGV[4])
local run_error, delay = ARGV[6], ARGV[5]
local step_at = r[7] and step_due(KEYS[1], r[6], tonumber(r[8]) or 0)
if delay ~= '' and step_at and now + math.floor(tonumber(delay)) >= step_at then
  local ok, last = pcall(cjson.decode, ARGV[6])
  local cause = ok and type(last) == 'table' and tostring(last['type']) or 'an error'
  run_error = event({type = 'StepDeadlineExceeded', retryable = false, traceback = '',
    message = 'step ' .. r[6] .. ' failed (' .. cause .. ') and its deadline_s leaves no time for the retry ' ..
      'it would get (' .. string.format('%d', step_at - (tonumber(r[8]) or 0)) .. ' ms from when it was queued)'})
  delay = ''
end
if delay ~= '' then
  local due = now + math.floor(tonumber(delay))
  redis.call('ZADD', KEYS[3], due, ARGV[1])
  redis.call('HSET', KEYS[1], 'status', 'retrying', 'dispatch', 'delayed', 'due_ms', due)
  index_active(KEYS[5], KEYS[4], ARGV[1], due)
  count(KEYS[8], 'steps_retried')
  return {'RETRY', due}
end
redis.call('HSET', KEYS[1], 'status', 'failed', 'error', run_error, 'finished_ms', now, 'dispatch', '')
unindex(KEYS[5], KEYS[4], ARGV[1])
redis.call('ZADD', KEYS[7], now, ARGV[1])
redis.call('RPUSH', KEYS[2], event({type = 'failed', at = now}))
count(KEYS[8], 'steps_failed')
count(KEYS[8], 'runs_failed')
announce(KEYS[10], KEYS[1], ARGV[1])
detail(KEYS[9], 1, 'runs', r[5], 'failed')
return {'FAILED'}
