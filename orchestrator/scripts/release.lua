-- Give a claimed step back without an outcome (graceful shutdown ran out of grace, or the
-- worker lost its claims): drop the claim and enqueue the step again at once. Not counted as a crash. The caller XACKs its
-- old entry afterwards.
-- KEYS[1] run  KEYS[2] history  KEYS[3] stream  KEYS[4] queued  KEYS[5] active  KEYS[6] stats
-- ARGV[1] run id  ARGV[2] claim token  ARGV[3] event body (JSON object)
-- Returns {'RELEASED', new entry id} | {'REPLAY'} (resent after a lost reply) |
--   {'TERMINAL', status} (cancelled meanwhile) | {'NOT_OWNER'} (the claim was replaced)
local r = redis.call('HMGET', KEYS[1], 'claim', 'wf', 'step', 'visit', 'done_claim', 'status')
if r[1] ~= ARGV[2] then
  if r[5] == ARGV[2] then return {'REPLAY'} end
  if TERMINAL[r[6]] then return {'TERMINAL', r[6]} end
  return {'NOT_OWNER'}
end
local now = now_ms()
local id = redis.call('XADD', KEYS[3], '*', 'run', ARGV[1], 'wf', r[2], 'step', r[3], 'visit', r[4])
redis.call('HSET', KEYS[1], 'claim', '', 'claim_fence', 0, 'done_claim', ARGV[2], 'dispatch', id,
  'updated_ms', now)
redis.call('RPUSH', KEYS[2], stamp('released', ARGV[3], now))
index_queued(KEYS[5], KEYS[4], ARGV[1], id)
count(KEYS[6], 'released')
return {'RELEASED', id}
