-- Commit a step: persist its record under the idempotency key (never overwriting), merge its
-- update into the state, advance the run, enqueue the next step and ack (XACK) the step's
-- own stream entry, all or nothing (the supervisor trims acked entries off the stream:
-- trim.lua). The entry is acked here only when this claim is
-- the live one: the entry is then the one the claim was made from, and no one else's (a
-- stream id is never reused while the claim that read it survives: Redis keeps a prefix of its
-- writes). Every other answer leaves the entry to the caller (ack.lua) or the supervisor.
-- KEYS[1] run  KEYS[2] state  KEYS[3] results  KEYS[4] stash  KEYS[5] history  KEYS[6] alive
-- KEYS[7] stream  KEYS[8] queued  KEYS[9] active  KEYS[10] done  KEYS[11] dead  KEYS[12] stats
-- KEYS[13] stats detail  KEYS[14] delayed  KEYS[15] signals  KEYS[16] deadlines  KEYS[17] children
-- KEYS[18] finished
-- ARGV[1] run id  ARGV[2] workflow  ARGV[3] idempotency key  ARGV[4] claim token
-- ARGV[5] step record JSON  ARGV[6] attempt event body (JSON object)  ARGV[7] next step, '' = end
-- ARGV[8] step duration ms  ARGV[9] step name  ARGV[10] cost JSON object ('' when none)
-- ARGV[11] consumer to chain the next step to ('' = none)  ARGV[12] claim token for that chained
-- claim  ARGV[13] group  ARGV[14] max committed steps per run (0 = no limit)
-- ARGV[15] the stream entry this claim was made from ('' = the caller acks)
-- ARGV[16] a Sleep's wake-up ('' = none; wake_due() in _prelude.lua): the run sleeps in the
-- delayed set until then, with no entry and no claim, and promote.lua wakes it
-- ARGV[17] a WaitFor ('' = none; JSON, wait_spec() in _prelude.lua): the run waits for that
-- signal with no entry and no claim (one already sent is delivered at once); signal.lua
-- delivers it, promote.lua ends the wait at its timeout
-- ARGV[18] a StartChildren ('' = none; JSON, children_spec() in _prelude.lua): the run waits
-- for those child runs (the caller starts them after this commit), child_done.lua moves it on
-- ARGV[19..] state field, JSON value pairs
-- Everything is validated before the first write (Lua does not roll back a script that fails
-- half-way), and the result is the last thing written before the run advances: a result that
-- exists therefore always comes with its state update applied.
-- Chaining: when ARGV[11] names a live worker (the committing one: it asks only so many times
-- in a row, and not while an entry it read waits long for a slot) and the claim was made from
-- the run's current dispatch (ARGV[15]), the next step is claimed for that worker right here,
-- what XREADGROUP + claim.lua would do a round trip later, with no new entry: the claim's entry
-- is left pending for the worker, unacked, and stays the run's dispatch while the run's steps
-- chain on it (its *anchor*). So a held run is a pending entry of its worker like any claimed
-- step: the supervisor's reclaim, the worker's own audit and KEDA's pending count see it, and
-- when its worker dies redispatch.lua re-enqueues the run's current step (the run moved on
-- from the entry). The commit that does not chain acks the anchor, as it acks any entry.
-- Returns {'OK', next step, visit, entry id} ({'OK', next step, visit, 'delayed', due ms} when
--   the run sleeps; {'OK', next step, visit, 'waiting', timeout ms or 0} when it waits for a
--   signal; {'OK', '', 0, '', created ms, now ms} when the run
--   completed, with a 7th element 'RUNAWAY' when it failed at max steps; {'OK', next step,
--   visit, the anchor entry id, <claim.lua's RUN reply without the state>} when chained: the state is the
--   caller's own, with its update merged, so it is not sent back) or
--   {'REPLAY'} (this very commit was already applied: same record; when that commit chained
--   the next step to ARGV[11] and the claim is still live, the same claim again, as for OK) |
--   {'FENCED', fence of the live claim} (this claim was replaced: another claim holds the step
--   or already committed it) | {'TERMINAL', status} | {'MISSING'} |
--   {'INVALID', reason} (an argument that would make a write fail: nothing was written)

local STATE_AT = 19

-- claim.lua's RUN reply for the step this commit chained, after the commit's own fields
local function with_claim(code, step, visit, id, fence, attempt, now, seq, work_ms)
  return {code, step, visit, id, 'RUN', fence, attempt, 0, 0, 0, 0, '', now, seq, work_ms}
end

-- Ack the entry this claim was made from (ARGV[15]), last: the commit is whole before it.
-- pcall: a vanished group or stream leaves nothing to ack, and must not fail a whole commit.
local function ack()
  if ARGV[15] ~= '' then redis.pcall('XACK', KEYS[7], ARGV[13], ARGV[15]) end
end

-- What would make a write below fail, as a reason; nil when everything is fine.
local function invalid(wf, step)
  local duration = tonumber(ARGV[8])
  if not duration or duration < 0 or duration ~= math.floor(duration) then
    return 'step duration ' .. ARGV[8] .. ' is not a whole number of ms'
  end
  if (#ARGV - STATE_AT + 1) % 2 ~= 0 then return 'state fields and values do not pair up' end
  if not tonumber(ARGV[14]) then return 'max steps ' .. ARGV[14] .. ' is not a number' end
  if ARGV[16] ~= '' and (ARGV[7] == '' or not wake_due(ARGV[16], 0)) then
    return 'wake-up ' .. ARGV[16] .. ' is not +<ms> or @<epoch ms> before a next step'
  end
  if ARGV[17] ~= '' and (ARGV[7] == '' or ARGV[16] ~= '' or not wait_spec(ARGV[17])) then
    return 'wait ' .. ARGV[17] .. ' is not a WaitFor before a next step'
  end
  if ARGV[18] ~= '' and (ARGV[7] == '' or ARGV[16] ~= '' or ARGV[17] ~= '' or not children_spec(ARGV[18])) then
    return 'children ' .. ARGV[18] .. ' are not a StartChildren before a next step'
  end
  if ARGV[10] == '' then return nil end
  local ok, cost = pcall(cjson.decode, ARGV[10])
  if not ok or type(cost) ~= 'table' then return 'cost is not a JSON object' end
  for unit, amount in pairs(cost) do
    if not finite(amount) then return 'cost ' .. unit .. ' = ' .. tostring(amount) .. ' is not a finite number' end
    for _, total in ipairs({
      redis.call('HGET', KEYS[1], 'cost:' .. unit),
      redis.call('HGET', KEYS[13], 'cost|' .. wf .. '|' .. step .. '|' .. unit),
    }) do
      if not finite((tonumber(total) or 0) + amount) then
        return 'cost ' .. unit .. ' would total ' .. tostring((tonumber(total) or 0) + amount)
      end
    end
  end
  return nil
end

local r = redis.call('HMGET', KEYS[1], 'status', 'claim', 'claim_fence', 'fence', 'seq', 'work_ms', 'created_ms',
  'stash_ms', 'v:' .. ARGV[7], 'dispatch', 'errors', 'crashes', 'stash_base_ms', 'sd')
if not r[1] then return {'MISSING'} end
-- A claim is issued only while its step has no result, and the commit that writes the result
-- moves the claim on in the same script: while the claim is ours, no result exists, and the
-- results are read only when it is not. (A commit stopped half-way by a script error leaves a
-- result behind with its claim; the worker never sends a call refused with an error again, and
-- the next claim finishes that commit: claim.lua.)
local stored = r[2] ~= ARGV[4] and redis.call('HGET', KEYS[3], ARGV[3])
if stored == ARGV[5] then
  -- our commit, resent after its reply was lost: hand back its chained claim if still ours
  local c = redis.call('HMGET', KEYS[1], 'claim', 'dispatch', 'step', 'visit', 'claim_fence', 'attempt')
  local now = now_ms()
  if ARGV[12] ~= '' and c[1] == ARGV[12] and c[3] == ARGV[7] and live(KEYS[6], ARGV[11], now) then
    return with_claim('REPLAY', c[3], tonumber(c[4]), c[2], tonumber(c[5]), tonumber(c[6]), now,
      tonumber(r[5]), tonumber(r[6]))
  end
  return {'REPLAY'}
end
if not stored and TERMINAL[r[1]] then return {'TERMINAL', r[1]} end
local problem = invalid(ARGV[2], ARGV[9])
if problem then return {'INVALID', problem} end
local now = now_ms()
if stored or r[2] ~= ARGV[4] then
  -- a claim is only issued while no result exists, so a result written by someone else, or
  -- a different live claim, both mean this claim was replaced while it ran
  redis.call('HINCRBY', KEYS[1], 'fenced', 1)
  redis.call('RPUSH', KEYS[5], stamp('fenced', ARGV[6], now))
  count(KEYS[12], 'fenced')
  detail(KEYS[13], 1, 'steps', ARGV[2], ARGV[9], 'fenced')
  return {'FENCED', tonumber(r[3])}
end

if #ARGV >= STATE_AT then redis.call('HSET', KEYS[2], unpack(ARGV, STATE_AT, #ARGV)) end
if ARGV[10] ~= '' then
  for unit, amount in pairs(cjson.decode(ARGV[10])) do
    redis.call('HINCRBYFLOAT', KEYS[1], 'cost:' .. unit, amount)
    redis.call('HINCRBYFLOAT', KEYS[13], 'cost|' .. ARGV[2] .. '|' .. ARGV[9] .. '|' .. unit, amount)
  end
end
if r[8] then
  -- the step kept a stash (stash.lua records stash_ms with it): the next step starts without one
  redis.call('HDEL', KEYS[4], ARGV[3])
  redis.call('HDEL', KEYS[1], 'stash_ms')
end
redis.call('RPUSH', KEYS[5], stamp('ok', ARGV[6], now))
redis.call('HINCRBY', KEYS[13], 'steps|' .. ARGV[2] .. '|' .. ARGV[9] .. '|ok', 1)  -- detail(), inlined
redis.call('HSET', KEYS[3], ARGV[3], ARGV[5])

local seq = tonumber(r[5] or 0) + 1
local work_ms = tonumber(r[6] or 0) + tonumber(ARGV[8])
local max_steps = tonumber(ARGV[14])
if ARGV[7] == '' or ARGV[16] ~= '' or ARGV[17] ~= '' or ARGV[18] ~= '' or (max_steps > 0 and seq >= max_steps) then
  -- the run ends, sleeps or waits here (completed, failed at max steps, a Sleep or a WaitFor):
  -- advance() in _prelude.lua
  local set = {seq = seq, work_ms = work_ms, stash_base_ms = 0}
  local keys = {run = KEYS[1], state = KEYS[2], history = KEYS[5], stream = KEYS[7], queued = KEYS[8],
    active = KEYS[9], done = KEYS[10], dead = KEYS[11], stats = KEYS[12], detail = KEYS[13], delayed = KEYS[14],
    signals = KEYS[15], deadlines = KEYS[16], children = KEYS[17], finished = KEYS[18]}
  local out = advance(keys, {run_id = ARGV[1], wf = ARGV[2], token = ARGV[4], next = ARGV[7],
    max_steps = max_steps, now = now, seq = seq, visits = tonumber(r[9] or 0), created_ms = tonumber(r[7]),
    wake = ARGV[16], wait = ARGV[17] ~= '' and wait_spec(ARGV[17]) or nil,
    children = ARGV[18] ~= '' and children_spec(ARGV[18]) or nil, idem = ARGV[3]}, set)
  hset(KEYS[1], set)
  ack()
  return out
end

-- The run goes on (every step but the last): what advance() does for it, written out flat
-- here, as this is the path of almost every commit.
local visit = tonumber(r[9] or 0) + 1
local visit_s = string.format('%d', visit)
-- The run's fields after this commit, chained or not, after `f` (the claim's own fields).
-- Fields that hold their value already are not written again, and numbers go as strings: each
-- field written costs a scan of the run hash, and a Lua number a %.17g conversion.
local function moved_on(f)
  local function put(name, value) f[#f + 1] = name; f[#f + 1] = value end
  local function zero(name, was) if was and was ~= '0' then put(name, '0') end end
  put('seq', string.format('%d', seq)); put('work_ms', string.format('%d', work_ms))
  put('done_claim', ARGV[4]); put('updated_ms', string.format('%d', now))
  put('v:' .. ARGV[7], visit_s); put('step', ARGV[7]); put('visit', visit_s)
  zero('errors', r[11]); zero('crashes', r[12]); zero('stash_base_ms', r[13])
  if r[1] ~= 'running' then put('status', 'running') end
  if r[14] then
    -- step deadlines: the next step's counts from now (_prelude.lua)
    put('queued_ms', string.format('%d', now))
    index_deadlines(KEYS[16], KEYS[1], ARGV[1], ARGV[7], now)
  end
  return unpack(f)
end
if ARGV[11] == '' or ARGV[15] == '' or r[10] ~= ARGV[15] or not live(KEYS[6], ARGV[11], now) then
  local id = redis.call('XADD', KEYS[7], '*', 'run', ARGV[1], 'wf', ARGV[2], 'step', ARGV[7], 'visit', visit_s)
  index_queued(KEYS[9], KEYS[8], ARGV[1], id)
  redis.call('HSET', KEYS[1], moved_on({'claim', '', 'claim_fence', '0', 'attempt', '0', 'dispatch', id}))
  ack()
  return {'OK', ARGV[7], visit, id}
end
-- chained: claim.lua for a fresh dispatch (no previous claim, attempt 1, no stash for a new
-- visit) of the same anchor entry, left pending. The run is in `active` already (claimed from
-- its dispatch); its score, the first claim's time, is left: the sweep looks at a run that has
-- not left `active` for sweep_after_s, finds it alive and scores it anew.
local fence = string.format('%d', math.max(tonumber(r[4] or 0) + 1, now))
redis.call('HSET', KEYS[1], moved_on({'claim', ARGV[12], 'claim_fence', fence, 'fence', fence,
  'claim_worker', ARGV[11], 'claim_ms', string.format('%d', now), 'attempt', '1'}))
return with_claim('OK', ARGV[7], visit, ARGV[15], tonumber(fence), 1, now, seq, work_ms)
