-- Move one due retry from the delayed set onto its queue's stream. ZREM decides races.
-- KEYS[1] delayed  KEYS[2] stream  KEYS[3] run  KEYS[4] stats  KEYS[5] queued  KEYS[6] active
-- ARGV[1] run id (the delayed set's member)
-- Returns the new entry id, or '' when another process promoted it or the run moved on.
if redis.call('ZREM', KEYS[1], ARGV[1]) == 0 then return '' end
local r = redis.call('HMGET', KEYS[3], 'status', 'step', 'visit', 'wf')
if r[1] ~= 'retrying' then return '' end
local id = redis.call('XADD', KEYS[2], '*', 'run', ARGV[1], 'wf', r[4], 'step', r[2], 'visit', r[3])
redis.call('HSET', KEYS[3], 'dispatch', id, 'status', 'running', 'updated_ms', now_ms())
index_queued(KEYS[6], KEYS[5], ARGV[1], id)
count(KEYS[4], 'promoted')
return id
