-- Supervisor: re-enqueue a pending entry whose claim has no live lease (its worker died), or
-- drop it when it no longer matters. XACK decides races: of two supervisors, one wins.
-- Only the entry that carries the run's current dispatch is re-enqueued: any other one is a
-- duplicate, or a retry's old entry whose backoff must not be skipped. A live entry gets its
-- idle time set so that it reaches the scan threshold (one lease) exactly when its lease would
-- run out if not renewed (XCLAIM to its owner, IDLE, JUSTID: no delivery counted): it leaves
-- the supervisor's scan until then instead of crowding out dead ones, and a kill is still
-- noticed as soon as the lease lapses.
-- KEYS[1] run  KEYS[2] lease  KEYS[3] results  KEYS[4] stream  KEYS[5] history  KEYS[6] stats
-- KEYS[7] queued  KEYS[8] active
-- ARGV[1] group  ARGV[2] entry id  ARGV[3] run id  ARGV[4] step  ARGV[5] visit
-- ARGV[6] idempotency key  ARGV[7] consumer that holds the entry  ARGV[8] lease ms
-- Returns {'REDISPATCHED', new entry id} | {'ALIVE'} | {'DROPPED', reason} | {'GONE'}
local function drop(reason)
  if redis.call('XACK', KEYS[4], ARGV[1], ARGV[2]) == 0 then return {'GONE'} end
  redis.call('XDEL', KEYS[4], ARGV[2])
  count(KEYS[6], 'dropped_entries')
  return {'DROPPED', reason}
end
local r = redis.call('HMGET', KEYS[1], 'status', 'step', 'visit', 'dispatch', 'wf')
if not r[1] then return drop('missing_run') end
if TERMINAL[r[1]] then return drop('terminal') end
if redis.call('HEXISTS', KEYS[3], ARGV[6]) == 1 then return drop('committed') end
if r[2] ~= ARGV[4] or r[3] ~= ARGV[5] then return drop('stale') end
if r[4] ~= ARGV[2] then return drop('not the current dispatch') end
local ttl = redis.call('PTTL', KEYS[2])
if ttl > 0 then
  local idle = math.max(0, tonumber(ARGV[8]) - ttl)
  redis.call('XCLAIM', KEYS[4], ARGV[1], ARGV[7], 0, ARGV[2], 'IDLE', idle, 'JUSTID')
  return {'ALIVE'}
end
if redis.call('XACK', KEYS[4], ARGV[1], ARGV[2]) == 0 then return {'GONE'} end
redis.call('XDEL', KEYS[4], ARGV[2])
local now = now_ms()
local id = redis.call('XADD', KEYS[4], '*', 'run', ARGV[3], 'wf', r[5], 'step', r[2], 'visit', r[3])
redis.call('HSET', KEYS[1], 'dispatch', id, 'updated_ms', now)
index_queued(KEYS[8], KEYS[7], ARGV[3], id)
redis.call('RPUSH', KEYS[5], event({type = 'redispatched', at = now, step = r[2], visit = tonumber(r[3]),
  detail = 'entry ' .. ARGV[2] .. ' had no live lease'}))
count(KEYS[6], 'redispatched')
return {'REDISPATCHED', id}
