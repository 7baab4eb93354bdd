-- Give a claimed step back without an outcome (graceful shutdown ran out of grace): drop the
-- lease and enqueue the step again at once. Not counted as a crash. The caller XACKs its
-- old entry afterwards.
-- KEYS[1] run  KEYS[2] lease  KEYS[3] history  KEYS[4] stream  KEYS[5] queued  KEYS[6] active
-- KEYS[7] stats
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
redis.call('DEL', KEYS[2])
local id = redis.call('XADD', KEYS[4], '*', 'run', ARGV[1], 'wf', r[2], 'step', r[3], 'visit', r[4])
redis.call('HSET', KEYS[1], 'claim', '', 'claim_fence', 0, 'done_claim', ARGV[2], 'dispatch', id,
  'updated_ms', now)
redis.call('RPUSH', KEYS[3], stamp('released', ARGV[3], now))
index_queued(KEYS[6], KEYS[5], ARGV[1], id)
count(KEYS[7], 'released')
return {'RELEASED', id}
