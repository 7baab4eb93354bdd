-- Re-drive a failed (dead-lettered or quarantined) run from the step that failed. The step
-- keeps its visit, so its idempotency key is the same as in the failed attempts.
-- KEYS[1] run  KEYS[2] history  KEYS[3] stream  KEYS[4] queued  KEYS[5] active  KEYS[6] dead
-- KEYS[7] stats  KEYS[8] stats detail
-- ARGV[1] run id  ARGV[2] reason  ARGV[3] request id (a resent call reports RETRIED again and
-- does not re-drive the run a second time)
-- Returns {'RETRIED', entry id, step, visit} | {'NOT_FAILED', status} | {'MISSING'}
local r = redis.call('HMGET', KEYS[1], 'status', 'wf', 'step', 'visit', 'retry_req', 'dispatch')
if not r[1] then return {'MISSING'} end
if r[5] == ARGV[3] then return {'RETRIED', r[6] or '', r[3], tonumber(r[4])} end
if r[1] ~= 'failed' then return {'NOT_FAILED', r[1]} end
local now = now_ms()
local id = redis.call('XADD', KEYS[3], '*', 'run', ARGV[1], 'wf', r[2], 'step', r[3], 'visit', r[4])
redis.call('HSET', KEYS[1], 'status', 'running', 'errors', 0, 'crashes', 0, 'claim', '', 'claim_fence', 0,
  'dispatch', id, 'updated_ms', now, 'retry_req', ARGV[3])
redis.call('HDEL', KEYS[1], 'error', 'finished_ms')
redis.call('ZREM', KEYS[6], ARGV[1])
index_queued(KEYS[5], KEYS[4], ARGV[1], id)
redis.call('RPUSH', KEYS[2], event({type = 'retried', at = now, step = r[3], visit = tonumber(r[4]),
  detail = ARGV[2]}))
count(KEYS[7], 'runs_retried')
detail(KEYS[8], 1, 'runs', r[2], 'retried')
return {'RETRIED', id, r[3], tonumber(r[4])}
