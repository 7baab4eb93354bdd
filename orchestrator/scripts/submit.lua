-- Create a run and enqueue its first step, unless a run with this id exists (idempotent submit).
-- KEYS[1] run  KEYS[2] state  KEYS[3] history  KEYS[4] stream  KEYS[5] active
-- ARGV[1] run id  ARGV[2] workflow  ARGV[3] queue  ARGV[4] first step  ARGV[5] input digest
-- ARGV[6] "submitted" event body (JSON object)  ARGV[7..] state field, JSON value pairs
-- Returns {1, entry id} when created, {0, workflow, input digest, status} when the id exists.
local existing = redis.call('HMGET', KEYS[1], 'wf', 'input_sha', 'status')
if existing[1] then
  return {0, existing[1], existing[2] or '', existing[3] or ''}
end
local now = now_ms()
local id = redis.call('XADD', KEYS[4], '*', 'run', ARGV[1], 'wf', ARGV[2], 'step', ARGV[4], 'visit', '1')
redis.call('HSET', KEYS[1],
  'wf', ARGV[2], 'queue', ARGV[3], 'status', 'pending', 'step', ARGV[4], 'visit', 1,
  'attempt', 0, 'errors', 0, 'crashes', 0, 'fence', 0, 'seq', 0, 'work_ms', 0, 'fenced', 0,
  'claim', '', 'claim_fence', 0, 'done_claim', '', 'dispatch', id, 'input_sha', ARGV[5],
  'created_ms', now, 'updated_ms', now, 'v:' .. ARGV[4], 1)
for i = 7, #ARGV, 2 do
  redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
end
redis.call('RPUSH', KEYS[3], stamp('submitted', ARGV[6], now))
redis.call('ZADD', KEYS[5], now, ARGV[1])
return {1, id}
