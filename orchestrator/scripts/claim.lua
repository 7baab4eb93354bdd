-- Claim a dispatched step for one attempt: a new fencing token, a lease, the state and the
-- last stash. Detects a previous claim that ended without an outcome (its worker died) and
-- counts it as a crash; quarantines the step after max crashes.
-- The fencing token is max(last + 1, server time in ms): it keeps increasing even when Redis
-- loses its last writes (a restart from an older AOF, a failover), as long as the server's
-- clock does not go back. The lease holds the claim token, which is unique per claim.
-- KEYS[1] run  KEYS[2] state  KEYS[3] results  KEYS[4] stash  KEYS[5] history  KEYS[6] lease
-- KEYS[7] active  KEYS[8] done  KEYS[9] dead  KEYS[10] stats  KEYS[11] stats detail
-- ARGV[1] step  ARGV[2] visit  ARGV[3] idempotency key  ARGV[4] claim token  ARGV[5] worker id
-- ARGV[6] lease ms  ARGV[7] max crashes  ARGV[8] stream entry id  ARGV[9] workflow  ARGV[10] run id
-- Returns {'RUN', fence, attempt, errors, crashes, crashed now 0|1, has stash 0|1, stash,
--          server ms, steps committed, work ms committed, field, value, ...} or {'MISSING'} | {'TERMINAL', status} | {'WRONG_WF', workflow} |
--          {'DUP'} | {'STALE', step, visit} | {'BUSY', worker} | {'QUARANTINED', crashes}
--          (STALE also when the run is waiting out a retry backoff: this entry is not its dispatch)
local r = redis.call('HMGET', KEYS[1], 'status', 'wf', 'step', 'visit', 'claim', 'claim_fence',
  'claim_worker', 'claim_ms', 'attempt', 'errors', 'crashes', 'fence', 'seq', 'work_ms')
local status = r[1]
if not status then return {'MISSING'} end
if r[2] ~= ARGV[9] then return {'WRONG_WF', r[2]} end
if redis.call('HEXISTS', KEYS[3], ARGV[3]) == 1 then return {'DUP'} end
if TERMINAL[status] then return {'TERMINAL', status} end
if r[3] ~= ARGV[1] or r[4] ~= ARGV[2] or status == 'retrying' then return {'STALE', r[3], r[4]} end

local function reply(fence, attempt, crashed)
  local out = {'RUN', fence, attempt, tonumber(r[10] or 0), tonumber(r[11] or 0), crashed}
  local snap = redis.call('HGET', KEYS[4], ARGV[3])
  if snap then
    table.insert(out, 1); table.insert(out, snap)
  else
    table.insert(out, 0); table.insert(out, '')
  end
  table.insert(out, now_ms())
  table.insert(out, tonumber(r[13] or 0))
  table.insert(out, tonumber(r[14] or 0))
  local state = redis.call('HGETALL', KEYS[2])
  for i = 1, #state do table.insert(out, state[i]) end
  return out
end

if r[5] == ARGV[4] then
  -- our own claim, retried after its reply was lost: hand back the same claim
  return reply(tonumber(r[6]), tonumber(r[9]), 0)
end

local now = now_ms()
local crashed = 0
if r[5] ~= '' then
  if redis.call('EXISTS', KEYS[6]) == 1 then return {'BUSY', r[7]} end
  -- the previous claim's lease ran out with no outcome: its worker died (or froze)
  crashed = 1
  count(KEYS[10], 'crashes')
  -- what resuming saves: the committed steps (and their cost) a restart from scratch would redo
  detail(KEYS[11], 1, 'steps', r[2], ARGV[1], 'crashed')
  detail(KEYS[11], tonumber(r[13] or 0), 'saved_steps', r[2])
  detail(KEYS[11], tonumber(r[14] or 0), 'saved_ms', r[2])
  local fields = redis.call('HGETALL', KEYS[1])
  for i = 1, #fields, 2 do
    if string.sub(fields[i], 1, 5) == 'cost:' then
      redis.call('HINCRBYFLOAT', KEYS[11], 'cost_saved|' .. r[2] .. '|' .. string.sub(fields[i], 6), fields[i + 1])
    end
  end
  r[11] = tostring(tonumber(r[11] or 0) + 1)
  redis.call('HSET', KEYS[1], 'crashes', r[11], 'claim', '', 'claim_fence', 0)
  redis.call('RPUSH', KEYS[5], event({type = 'crashed', at = now, step = ARGV[1], visit = tonumber(ARGV[2]),
    attempt = tonumber(r[9]), fence = tonumber(r[6]), worker = r[7], start_ms = tonumber(r[8]), end_ms = now}))
  if tonumber(r[11]) >= tonumber(ARGV[7]) then
    local msg = 'step ' .. ARGV[1] .. ' crashed its worker ' .. r[11] .. ' times (last on ' .. r[7] ..
      '); quarantined so it cannot take down more workers. Fix the step, then retry the run.'
    local err = event({type = 'Quarantined', message = msg, traceback = '', retryable = false})
    redis.call('HSET', KEYS[1], 'status', 'failed', 'error', err, 'finished_ms', now, 'updated_ms', now,
      'dispatch', '')
    redis.call('ZREM', KEYS[7], ARGV[10])
    redis.call('ZADD', KEYS[9], now, ARGV[10])
    redis.call('RPUSH', KEYS[5], event({type = 'quarantined', at = now, step = ARGV[1],
      visit = tonumber(ARGV[2]), detail = msg}))
    count(KEYS[10], 'quarantined')
    count(KEYS[10], 'runs_failed')
    detail(KEYS[11], 1, 'runs', r[2], 'failed')
    return {'QUARANTINED', tonumber(r[11])}
  end
end

local fence = math.max(tonumber(r[12] or 0) + 1, now)
local attempt = redis.call('HINCRBY', KEYS[1], 'attempt', 1)
redis.call('HSET', KEYS[1], 'fence', string.format('%d', fence), 'claim', ARGV[4],
  'claim_fence', string.format('%d', fence), 'claim_worker', ARGV[5], 'claim_ms', now, 'status', 'running',
  'dispatch', ARGV[8], 'updated_ms', now)
redis.call('SET', KEYS[6], ARGV[4], 'PX', ARGV[6])
redis.call('ZADD', KEYS[7], now, ARGV[10])
r[9] = tostring(attempt)
return reply(fence, attempt, crashed)
