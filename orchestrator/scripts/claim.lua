-- Claim a dispatched step for one attempt: a new fencing token, the claim, the state and the
-- last stash. Detects a previous claim that ended without an outcome (its worker died) and
-- counts it as a crash; quarantines the step after max crashes.
-- The fencing token is max(last + 1, server time in ms): it keeps increasing even when Redis
-- loses its last writes (a restart from an older AOF, a failover), as long as the server's
-- clock does not go back. The claim token (ARGV[4]) is unique per claim call (the worker puts
-- a nonce in it), so an attempt that Redis forgot after losing writes can never pass for the
-- claim that replaced it, even when the same worker read the same entry again.
-- The claim is live while its worker is (`live` in _prelude.lua: the worker's deadline in the
-- partition's alive hash); a worker whose own deadline has passed may not claim (LAPSED): its
-- claims would be born dead.
-- Only the entry that is the run's current dispatch can be claimed: a late claim of an entry the
-- supervisor already replaced is STALE, so it cannot take the step away from the new entry.
-- KEYS[1] run  KEYS[2] state  KEYS[3] results  KEYS[4] stash  KEYS[5] history  KEYS[6] alive
-- KEYS[7] stream  KEYS[8] queued  KEYS[9] active  KEYS[10] done  KEYS[11] dead  KEYS[12] stats
-- KEYS[13] stats detail  KEYS[14] delayed  KEYS[15] signals  KEYS[16] deadlines  KEYS[17] children
-- KEYS[18] finished
-- ARGV[1] step  ARGV[2] visit  ARGV[3] idempotency key  ARGV[4] claim token  ARGV[5] worker id
-- ARGV[6] max crashes  ARGV[7] stream entry id  ARGV[8] workflow  ARGV[9] run id
-- ARGV[10] max committed steps per run (0 = no limit)
-- Returns {'RUN', fence, attempt, errors, crashes, crashed now 0|1, has stash 0|1, stash,
--          server ms, steps committed, work ms kept, field, value, ...} or {'MISSING'} | {'TERMINAL', status} | {'WRONG_WF', workflow} |
--          {'DUP'} | {'DUP', 'advanced'} | {'STALE', step, visit} | {'BUSY', worker} | {'QUARANTINED', crashes} |
--          (BUSY also for the entry a run's chained steps are held on: see commit.lua)
--          {'LAPSED'} (the claiming worker's own deadline has passed: nothing written)
--          (STALE also when the run is waiting out a retry backoff, sleeping or waiting for a signal, or when this entry is not the
--          run's current dispatch; DUP 'advanced' when the step's result existed but the run had
--          not moved on, a commit stopped half-way, and this claim moved it on)
--          "work ms kept": the step time of the committed steps, plus, when the previous attempt
--          crashed, what the step's stash keeps of it (what a restart from scratch would redo)
local r = redis.call('HMGET', KEYS[1], 'status', 'wf', 'step', 'visit', 'claim', 'claim_fence',
  'claim_worker', 'claim_ms', 'attempt', 'errors', 'crashes', 'fence', 'seq', 'work_ms', 'dispatch', 'stash_ms',
  'dead_worker', 'stash_base_ms')
local status = r[1]
if not status then return {'MISSING'} end
if r[2] ~= ARGV[8] then return {'WRONG_WF', r[2]} end
local stored = redis.call('HGET', KEYS[3], ARGV[3])
if stored then
  -- this entry is the run's dispatch but the run moved on: its worker holds the run's steps on
  -- it (chained, commit.lua); delivered again (Redis lost writes), it must stay pending, as the
  -- anchor that recovers the run if that worker dies
  if r[15] == ARGV[7] and not TERMINAL[status] and (r[3] ~= ARGV[1] or r[4] ~= ARGV[2]) then
    return {'BUSY', r[7]}
  end
  if TERMINAL[status] or r[3] ~= ARGV[1] or r[4] ~= ARGV[2] then return {'DUP'} end
  -- the result exists but the run is still at this step: finish that commit from its record
  local ok, record = pcall(cjson.decode, stored)
  local nxt = ok and type(record) == 'table' and record['next'] or nil
  if type(nxt) ~= 'string' then nxt = '' end
  -- a Sleep's wake-up: '+<ms>' counts from now, later than the commit meant: never early
  local wake = ok and type(record) == 'table' and record['wake'] or nil
  if type(wake) ~= 'string' or nxt == '' or not wake_due(wake, 0) then wake = '' end
  -- a WaitFor: the run waits (or takes a signal sent meanwhile) as the commit meant it to
  local wait = ok and type(record) == 'table' and nxt ~= '' and wake == '' and wait_spec(record['wait']) or nil
  local children = ok and type(record) == 'table' and nxt ~= '' and wake == '' and not wait and
    record['children'] and children_spec(record['children']) or nil
  local keys = {run = KEYS[1], state = KEYS[2], history = KEYS[5], stream = KEYS[7], queued = KEYS[8],
    active = KEYS[9], done = KEYS[10], dead = KEYS[11], stats = KEYS[12], detail = KEYS[13], delayed = KEYS[14],
    signals = KEYS[15], deadlines = KEYS[16], children = KEYS[17], finished = KEYS[18]}
  local now = now_ms()
  redis.call('RPUSH', KEYS[5], event({type = 'repaired', at = now, step = ARGV[1], visit = tonumber(ARGV[2]),
    detail = 'result persisted but the run had not moved on; advanced from the result'}))
  count(KEYS[12], 'repaired')
  -- commit.lua writes the run hash last, so the stopped commit's step is not counted in it yet
  local seq = tonumber(r[13] or 0) + 1
  local took = ok and type(record) == 'table' and tonumber(record['end_ms']) and tonumber(record['start_ms'])
    and math.max(0, record['end_ms'] - record['start_ms']) or 0
  local set = {seq = seq, work_ms = tonumber(r[14] or 0) + took}
  advance(keys, {run_id = ARGV[9], wf = r[2], token = r[5] or '', next = nxt,
    max_steps = tonumber(ARGV[10]) or 0, now = now, seq = seq,
    visits = tonumber(redis.call('HGET', KEYS[1], 'v:' .. nxt) or 0),
    created_ms = tonumber(redis.call('HGET', KEYS[1], 'created_ms')), wake = wake, wait = wait,
    children = children, idem = ARGV[3]}, set)
  hset(KEYS[1], set)
  return {'DUP', 'advanced'}
end
if TERMINAL[status] then return {'TERMINAL', status} end
if r[3] ~= ARGV[1] or r[4] ~= ARGV[2] or status == 'retrying' or status == 'sleeping' or status == 'waiting' then
  return {'STALE', r[3], r[4]}
end
if r[15] ~= ARGV[7] then return {'STALE', r[3], r[4]} end

-- the step time this step's stash keeps (0 without a stash of this step); stash.lua writes
-- stash_ms with every stash, so a run without it has none to read
local snap = r[16] and redis.call('HGET', KEYS[4], ARGV[3])
local stash_kept = snap and (tonumber(r[16]) or 0) or 0

local function reply(fence, attempt, crashed, now)
  local out = {'RUN', fence, attempt, tonumber(r[10] or 0), tonumber(r[11] or 0), crashed}
  if snap then
    table.insert(out, 1); table.insert(out, snap)
  else
    table.insert(out, 0); table.insert(out, '')
  end
  table.insert(out, now)
  table.insert(out, tonumber(r[13] or 0))
  table.insert(out, tonumber(r[14] or 0) + (crashed == 1 and stash_kept or 0))
  local state = redis.call('HGETALL', KEYS[2])
  for i = 1, #state do table.insert(out, state[i]) end
  return out
end

local now = now_ms()
if not live(KEYS[6], ARGV[5], now) then return {'LAPSED'} end
if r[5] == ARGV[4] then
  -- our own claim, resent after its reply was lost: hand back the same claim (nobody else
  -- claimed since: the claim is still ours)
  return reply(tonumber(r[6]), tonumber(r[9]), 0, now)
end

local crashed = 0
if r[5] ~= '' then
  if live(KEYS[6], r[7], now) then return {'BUSY', r[7]} end
  -- the previous claim's worker is not live and left no outcome: it died (or froze)
  crashed = 1
  local crashes = tonumber(r[11] or 0) + 1
  count(KEYS[12], 'crashes')
  -- what resuming saves: the committed steps (and their cost) a restart from scratch would redo
  detail(KEYS[13], 1, 'steps', r[2], ARGV[1], 'crashed')
  detail(KEYS[13], tonumber(r[13] or 0), 'saved_steps', r[2])
  detail(KEYS[13], tonumber(r[14] or 0), 'saved_ms', r[2])
  detail(KEYS[13], stash_kept, 'saved_stash_ms', r[2])
  local fields = redis.call('HGETALL', KEYS[1])
  for i = 1, #fields, 2 do
    if string.sub(fields[i], 1, 5) == 'cost:' then
      -- a metric only: a total that would overflow is left as it is rather than failing the claim
      redis.pcall('HINCRBYFLOAT', KEYS[13], 'cost_saved|' .. r[2] .. '|' .. string.sub(fields[i], 6), fields[i + 1])
    end
  end
  redis.call('HSET', KEYS[1], 'crashes', crashes, 'claim', '', 'claim_fence', 0)
  -- a re-dispatched claim's worker is named '' in the run, and kept as dead_worker
  local worker = r[7] ~= '' and r[7] or r[17] or nil
  redis.call('RPUSH', KEYS[5], event({type = 'crashed', at = now, step = ARGV[1], visit = tonumber(ARGV[2]),
    attempt = tonumber(r[9]), fence = tonumber(r[6]), worker = worker, start_ms = tonumber(r[8]), end_ms = now}))
  r[11] = tostring(crashes)
  if crashes >= tonumber(ARGV[6]) then
    local msg = 'step ' .. ARGV[1] .. ' crashed its worker ' .. crashes .. ' times (last on ' ..
      (worker or 'a worker that gave it up') ..
      '); quarantined so it cannot take down more workers. Fix the step, then retry the run.'
    local err = event({type = 'Quarantined', message = msg, traceback = '', retryable = false})
    redis.call('HSET', KEYS[1], 'status', 'failed', 'error', err, 'finished_ms', now, 'updated_ms', now,
      'dispatch', '')
    unindex(KEYS[9], KEYS[8], ARGV[9])
    redis.call('ZADD', KEYS[11], now, ARGV[9])
    redis.call('RPUSH', KEYS[5], event({type = 'quarantined', at = now, step = ARGV[1],
      visit = tonumber(ARGV[2]), detail = msg}))
    count(KEYS[12], 'quarantined')
    count(KEYS[12], 'runs_failed')
    announce(KEYS[18], KEYS[1], ARGV[9])
    detail(KEYS[13], 1, 'runs', r[2], 'failed')
    return {'QUARANTINED', crashes}
  end
end

local fence = math.max(tonumber(r[12] or 0) + 1, now)
local attempt = tonumber(r[9] or 0) + 1
local fence_s, now_s = string.format('%d', fence), string.format('%d', now)
local set = {'attempt', string.format('%d', attempt), 'fence', fence_s, 'claim', ARGV[4], 'claim_fence', fence_s,
  'claim_worker', ARGV[5], 'claim_ms', now_s, 'updated_ms', now_s}
-- fields that hold their value already are not written again (commit.lua says why)
if status ~= 'running' then table.insert(set, 'status'); table.insert(set, 'running') end
if stash_kept ~= 0 or (r[18] and r[18] ~= '0') then
  table.insert(set, 'stash_base_ms'); table.insert(set, string.format('%d', stash_kept))
end
redis.call('HSET', KEYS[1], unpack(set))
index_active(KEYS[9], KEYS[8], ARGV[9], now)
return reply(fence, attempt, crashed, now)
