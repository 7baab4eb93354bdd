-- Cancel an unfinished run: it ends now; a running step learns it at its worker's next
-- heartbeat (the run id goes on the partition's cancels stream, which every worker's beat
-- reads: alive.lua) and its late commit is refused.
-- KEYS[1] run  KEYS[2] cancels  KEYS[3] history  KEYS[4] delayed  KEYS[5] queued  KEYS[6] active
-- KEYS[7] done  KEYS[8] stats  KEYS[9] stats detail  KEYS[10] finished (a parent's children are
-- cancelled by the supervisor when it reads the notice, and by Client.cancel at once)
-- ARGV[1] run id  ARGV[2] reason  ARGV[3] request id (a resent call reports CANCELLED again)
-- Returns {'CANCELLED'} | {'TERMINAL', status} | {'MISSING'}
local r = redis.call('HMGET', KEYS[1], 'status', 'step', 'visit', 'cancel_req', 'wf')
if not r[1] then return {'MISSING'} end
if r[1] == 'cancelled' and r[4] == ARGV[3] then return {'CANCELLED'} end
if TERMINAL[r[1]] then return {'TERMINAL', r[1]} end
local now = now_ms()
redis.call('ZREM', KEYS[4], ARGV[1])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', 1000, '*', 'run', ARGV[1])
redis.call('HSET', KEYS[1], 'status', 'cancelled', 'claim', '', 'claim_fence', 0, 'dispatch', '',
  'finished_ms', now, 'updated_ms', now, 'cancel_req', ARGV[3])
unindex(KEYS[6], KEYS[5], ARGV[1])
redis.call('ZADD', KEYS[7], now, ARGV[1])
redis.call('RPUSH', KEYS[3], event({type = 'cancelled', at = now, step = r[2], visit = tonumber(r[3]),
  detail = ARGV[2]}))
count(KEYS[8], 'runs_cancelled')
announce(KEYS[10], KEYS[1], ARGV[1])
detail(KEYS[9], 1, 'runs', r[5], 'cancelled')
return {'CANCELLED'}
