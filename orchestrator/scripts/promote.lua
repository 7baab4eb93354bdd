-- Move one due retry from the delayed set onto its queue's stream. ZREM decides races.
-- KEYS[1] delayed  KEYS[2] stream  KEYS[3] run  KEYS[4] stats
-- ARGV[1] member  ARGV[2] run id  ARGV[3] step  ARGV[4] visit
-- Returns the new entry id, or '' when another process promoted it or the run moved on.
if redis.call('ZREM', KEYS[1], ARGV[1]) == 0 then return '' end
local r = redis.call('HMGET', KEYS[3], 'status', 'step', 'visit', 'wf')
if r[1] ~= 'retrying' or r[2] ~= ARGV[3] or r[3] ~= ARGV[4] then return '' end
local id = redis.call('XADD', KEYS[2], '*', 'run', ARGV[2], 'wf', r[4], 'step', r[2], 'visit', r[3])
redis.call('HSET', KEYS[3], 'dispatch', id, 'status', 'running', 'updated_ms', now_ms())
count(KEYS[4], 'promoted')
return id
