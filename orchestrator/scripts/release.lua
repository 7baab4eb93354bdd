-- Give a claimed step back without an outcome (graceful shutdown ran out of grace): drop the
-- lease and enqueue the step again at once. Not counted as a crash. The caller XACKs its
-- old entry afterwards.
-- KEYS[1] run  KEYS[2] lease  KEYS[3] history  KEYS[4] stream  KEYS[5] active  KEYS[6] stats
-- ARGV[1] run id  ARGV[2] claim token  ARGV[3] event body (JSON object)
-- Returns {'RELEASED', new entry id} | {'NOT_OWNER'}
local r = redis.call('HMGET', KEYS[1], 'claim', 'wf', 'step', 'visit')
if r[1] ~= ARGV[2] then return {'NOT_OWNER'} end
local now = now_ms()
redis.call('DEL', KEYS[2])
local id = redis.call('XADD', KEYS[4], '*', 'run', ARGV[1], 'wf', r[2], 'step', r[3], 'visit', r[4])
redis.call('HSET', KEYS[1], 'claim', '', 'claim_fence', 0, 'done_claim', ARGV[2], 'dispatch', id,
  'updated_ms', now)
redis.call('RPUSH', KEYS[3], stamp('released', ARGV[3], now))
redis.call('ZADD', KEYS[5], now, ARGV[1])
count(KEYS[6], 'released')
return {'RELEASED', id}
