-- Create a run and enqueue its first step, unless a run with this id exists (idempotent submit).
-- KEYS[1] run  KEYS[2] state  KEYS[3] history  KEYS[4] stream  KEYS[5] queued  KEYS[6] stats detail
-- KEYS[7] deadlines
-- (runs_submitted is the sum of the detail's runs|wf|submitted: counters.py)
-- ARGV[1] run id  ARGV[2] workflow  ARGV[3] queue  ARGV[4] first step  ARGV[5] input digest
-- ARGV[6] "submitted" event body (JSON object)  ARGV[7] request id (resent call = same id)
-- ARGV[8] deadline: ms from now on this server's clock ('' = none); the supervisor fails the run
-- when it passes (expire.lua)
-- ARGV[9] step deadlines: a JSON object, step name -> ms ('' = none; see step_due in _prelude.lua)
-- ARGV[10] the parent of a child run: its run id, queue and the child's index, '|'-separated
-- ('' = none); the run says when it finishes (announce() in _prelude.lua)
-- ARGV[11] the run's on_finish callback (JSON: RQ queue, function, timeout; '' = none): the run says
-- when it finishes, and the supervisor's relay enqueues it (orchestrator/bridge/callback.py); like
-- every field, the first submit's is kept (a resubmit of the id writes nothing)
-- ARGV[12..] state field, JSON value pairs
-- Returns {1, entry id} when this request created the run (also when it is resent after a
-- lost reply), {0, workflow, input digest, status} when the id belongs to an existing run.
local existing = redis.call('HMGET', KEYS[1], 'wf', 'input_sha', 'status', 'submit_req', 'dispatch')
if existing[1] then
  if existing[4] == ARGV[7] then return {1, existing[5] or ''} end
  return {0, existing[1], existing[2] or '', existing[3] or ''}
end
if ARGV[8] ~= '' and not string.match(ARGV[8], '^%d+$') then
  return redis.error_reply('deadline ' .. ARGV[8] .. ' is not a whole number of ms')
end
local step_deadlines = {}
if ARGV[9] ~= '' then
  local ok, decoded = pcall(cjson.decode, ARGV[9])
  if not ok or type(decoded) ~= 'table' then return redis.error_reply('step deadlines are not a JSON object') end
  for step, ms in pairs(decoded) do
    if type(step) ~= 'string' or type(ms) ~= 'number' or ms <= 0 or ms ~= math.floor(ms) then
      return redis.error_reply('step deadline of ' .. tostring(step) .. ' is not a whole number of ms above 0')
    end
    step_deadlines[#step_deadlines + 1] = 'sd:' .. step
    step_deadlines[#step_deadlines + 1] = string.format('%d', ms)
  end
end
local now = now_ms()
local id = redis.call('XADD', KEYS[4], '*', 'run', ARGV[1], 'wf', ARGV[2], 'step', ARGV[4], 'visit', '1')
redis.call('HSET', KEYS[1],
  'wf', ARGV[2], 'queue', ARGV[3], 'status', 'pending', 'step', ARGV[4], 'visit', 1,
  'attempt', 0, 'errors', 0, 'crashes', 0, 'fence', 0, 'seq', 0, 'work_ms', 0, 'fenced', 0,
  'claim', '', 'claim_fence', 0, 'done_claim', '', 'dispatch', id, 'input_sha', ARGV[5],
  'created_ms', now, 'updated_ms', now, 'v:' .. ARGV[4], 1, 'submit_req', ARGV[7])
if #ARGV >= 12 then redis.call('HSET', KEYS[2], unpack(ARGV, 12, #ARGV)) end
if ARGV[11] ~= '' then redis.call('HSET', KEYS[1], 'on_finish', ARGV[11], 'notify', 1) end
if ARGV[10] ~= '' then
  local parent, queue, index = string.match(ARGV[10], '^([^|]+)|([^|]+)|(%d+)$')
  if parent then
    redis.call('HSET', KEYS[1], 'parent', parent, 'parent_queue', queue, 'parent_index', index, 'notify', 1)
  end
end
if ARGV[8] ~= '' then
  local deadline = now + tonumber(ARGV[8])
  redis.call('HSET', KEYS[1], 'deadline_ms', deadline)
  redis.call('ZADD', KEYS[7], deadline, ARGV[1])
end
if #step_deadlines > 0 then
  redis.call('HSET', KEYS[1], 'sd', 1, unpack(step_deadlines))
  step_queued(KEYS[7], KEYS[1], ARGV[1], ARGV[4], now)
end
redis.call('RPUSH', KEYS[3], stamp('submitted', ARGV[6], now))
redis.call('ZADD', KEYS[5], exact(entry_score(id)), ARGV[1])
detail(KEYS[6], 1, 'runs', ARGV[2], 'submitted')
return {1, id}
