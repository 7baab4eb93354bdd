-- Send a signal to a run: record it under its id (a second send of the same id changes
-- nothing), then deliver it at once when the run waits for it (its payload into the state, the
-- run's next step on its queue, the wait's timeout removed), or keep it for the step that will
-- wait for it (a commit that waits takes the oldest one kept: see advance in _prelude.lua).
-- KEYS[1] run  KEYS[2] state  KEYS[3] signals  KEYS[4] history  KEYS[5] stream  KEYS[6] queued
-- KEYS[7] active  KEYS[8] delayed  KEYS[9] stats  KEYS[10] deadlines
-- ARGV[1] run id  ARGV[2] signal id (no spaces)  ARGV[3] name  ARGV[4] payload (JSON, checked
-- by the sender against the workflow's model)  ARGV[5] digest of name and payload (tells a resent
-- signal from another one under the same id)  ARGV[6] most signals one run may be sent
-- Returns {'DELIVERED', step, visit} | {'BUFFERED'} |
--   {'DUP', step:visit it was delivered to, or ''} (this id was sent before: nothing changed) |
--   {'CONFLICT', name} (this id was sent before with another name or payload) |
--   {'TERMINAL', status} | {'MISSING'} | {'FULL', count} | {'INVALID', reason}
local r = redis.call('HMGET', KEYS[1], 'status', 'wf', 'step', 'visit', 'wait_signal', 'wait_into')
if not r[1] then return {'MISSING'} end
local prior = redis.call('HGET', KEYS[3], 's:' .. ARGV[2])
if prior then
  local ok, record = pcall(cjson.decode, prior)
  if not ok or type(record) ~= 'table' or record['name'] ~= ARGV[3] or record['sha'] ~= ARGV[5] then
    return {'CONFLICT', ok and type(record) == 'table' and tostring(record['name']) or '?'}
  end
  return {'DUP', redis.call('HGET', KEYS[3], 'u:' .. ARGV[2]) or ''}
end
if TERMINAL[r[1]] then return {'TERMINAL', r[1]} end
if not string.match(ARGV[2], '^%S+$') or not string.match(ARGV[3], '^[%w_]+$') then
  return {'INVALID', 'signal id ' .. ARGV[2] .. ' or name ' .. ARGV[3] .. ' is malformed'}
end
local sent = tonumber(redis.call('HGET', KEYS[3], '#') or 0)
if sent >= tonumber(ARGV[6]) then return {'FULL', sent} end

local now = now_ms()
redis.call('HSET', KEYS[3], '#', sent + 1,
  's:' .. ARGV[2], event({name = ARGV[3], sha = ARGV[5], at = now, n = sent + 1}))
redis.call('RPUSH', KEYS[4], event({type = 'signal', at = now, signal = ARGV[3], signal_id = ARGV[2]}))
count(KEYS[9], 'signals')
if r[1] ~= 'waiting' or r[5] ~= ARGV[3] then
  -- kept for the step that waits for it; delivered when the run gets there
  local queue = redis.call('HGET', KEYS[3], 'q:' .. ARGV[3])
  redis.call('HSET', KEYS[3], 'b:' .. ARGV[2], ARGV[4], 'q:' .. ARGV[3], queue and (queue .. ' ' .. ARGV[2]) or ARGV[2])
  return {'BUFFERED'}
end
local k = {state = KEYS[2], signals = KEYS[3], history = KEYS[4], stats = KEYS[9], delayed = KEYS[8]}
deliver(k, ARGV[1], ARGV[2], ARGV[3], ARGV[4], r[6], r[3], tonumber(r[4]), now)
local id = redis.call('XADD', KEYS[5], '*', 'run', ARGV[1], 'wf', r[2], 'step', r[3], 'visit', r[4])
redis.call('HSET', KEYS[1], 'status', 'running', 'dispatch', id, 'wait_signal', '', 'updated_ms', now)
step_queued(KEYS[10], KEYS[1], ARGV[1], r[3], now)
index_queued(KEYS[7], KEYS[6], ARGV[1], id)
return {'DELIVERED', r[3], tonumber(r[4])}
