-- Shared helpers, prepended to every script when it is loaded (scripts.py).
-- Times are the Redis server's clock, never a worker's.
-- Rule for every script: read and validate everything first, write after. Lua does not roll
-- back a script that fails half-way, so an error must come before the first write.

local TERMINAL = {completed = true, failed = true, cancelled = true}

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- A history event: the JSON object `body` (built and escaped by Python, at least one field)
-- with "type" and the server time "at" put in front.
local function stamp(kind, body, now)
  return '{"type":"' .. kind .. '","at":' .. string.format('%d', now) .. ',' .. string.sub(body, 2)
end

-- Add to a fleet-wide counter in the stats hash, in the same atomic step as what it counts.
local function count(stats_key, name, amount)
  redis.call('HINCRBY', stats_key, name, amount or 1)
end

-- Add to a per-workflow / per-step counter (fields joined with '|'), for metrics.
local function detail(detail_key, amount, ...)
  redis.call('HINCRBY', detail_key, table.concat({...}, '|'), amount)
end

-- A history event built here from a Lua table (cjson escapes the strings).
local function event(fields)
  return cjson.encode(fields)
end

-- The fields of consumer group `group` of `stream` (XINFO GROUPS: name, last-delivered-id,
-- lag, ...) as a table; nil when the stream or the group is gone.
local function group_info(stream, group)
  local groups = redis.pcall('XINFO', 'GROUPS', stream)
  if groups.err then return nil end
  for _, info in ipairs(groups) do
    local g = {}
    for i = 1, #info, 2 do g[info[i]] = info[i + 1] end
    if g['name'] == group then return g end
  end
  return nil
end

-- Liveness is per worker, not per claim: a claim is live while the run's claim_worker has a
-- deadline ahead of now in its partition's `alive` hash (each heartbeat moves it on, alive.lua).
-- A worker killed or frozen lets every claim it holds lapse at once; one that gave a step up is
-- named '' in the run, which is never alive.
local function live(alive, worker, now)
  if not worker or worker == '' then return false end
  local deadline = redis.call('HGET', alive, worker)
  return deadline ~= false and tonumber(deadline) > now
end

local function finite(x)
  return type(x) == 'number' and x == x and x ~= math.huge and x ~= -math.huge
end

-- The queued index's score of a stream entry id 'ms-seq': ms * 2048 + seq, which orders entries
-- exactly as their ids do (a seq past 2047 in one ms, never seen with '*' ids, ties instead).
-- A whole number, exact as a double until the year 2109, so Redis keeps it as an integer: a
-- fractional score costs a string-to-double parse at every comparison in a small sorted set.
local SEQS = 2048
local function entry_score(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms) * SEQS + math.min(tonumber(seq), SEQS - 1)
end

-- A score as Redis should read it: all 17 digits (tostring would keep 14).
local function exact(score)
  return string.format('%.17g', score)
end

-- Where an unfinished run is indexed (see keys.py): a run whose dispatch waits in a stream is
-- in that queue's `queued` index, scored by its entry's time, so the sweep finds it once the
-- consumer group has passed its entry (or its entry was trimmed away); any other unfinished run
-- (claimed, or a retry waiting out its backoff) is in `active`, scored by when to look at it.
local function index_queued(active, queued, run_id, entry_id)
  redis.call('ZREM', active, run_id)
  redis.call('ZADD', queued, exact(entry_score(entry_id)), run_id)
end

local function index_active(active, queued, run_id, score)
  redis.call('ZREM', queued, run_id)
  redis.call('ZADD', active, score, run_id)
end

local function unindex(active, queued, run_id)
  redis.call('ZREM', active, run_id)
  redis.call('ZREM', queued, run_id)
end

-- One HSET of every field in the table `fields` (one command instead of one per field).
local function hset(key, fields)
  local flat = {}
  for name, value in pairs(fields) do
    flat[#flat + 1] = name
    flat[#flat + 1] = value
  end
  if #flat > 0 then redis.call('HSET', key, unpack(flat)) end
end

-- A Sleep's wake-up (Sleep.wake in workflow.py: '+<ms>' after `now`, or '@<epoch ms>') as a due
-- time on this server's clock; nil when it is malformed. A time already past is due now.
local function wake_due(wake, now)
  local kind, ms = string.match(wake, '^([+@])(%d+)$')
  if not kind or #ms > 15 then return nil end
  if kind == '+' then return now + tonumber(ms) end
  return math.max(now, tonumber(ms))
end

-- `x` decoded when it is JSON text (nil when that does not parse), as it is otherwise.
local function decoded(x)
  if type(x) ~= 'string' then return x end
  local ok, value = pcall(cjson.decode, x)
  return ok and value or nil
end

-- A WaitFor as commit.lua takes it (Workflow.wait_spec: a JSON object, or the table a step
-- record holds) as {signal, into, timeout_ms (0 = none), on_timeout ('' = the next step)};
-- nil when it is malformed.
local function wait_spec(w)
  w = decoded(w)
  if type(w) ~= 'table' or type(w.signal) ~= 'string' or not string.match(w.signal, '^[%w_]+$')
    or type(w.into) ~= 'string' or w.into == '' then return nil end
  local timeout = w.timeout_ms or 0
  if type(timeout) ~= 'number' or timeout < 0 or timeout ~= math.floor(timeout) or timeout > 1e13 then return nil end
  local on_timeout = w.on_timeout or ''
  if type(on_timeout) ~= 'string' then return nil end
  return {signal = w.signal, into = w.into, timeout_ms = timeout, on_timeout = on_timeout}
end

-- A run's signals hash (keys.py): '#' signals accepted, 's:<id>' each one's record, 'b:<id>'
-- the payload of one not delivered yet, 'q:<name>' the ids of those, space-separated in arrival
-- order, 'u:<id>' the step:visit a signal was delivered to.
-- The oldest signal `name` not delivered yet, taken off its queue: its id and payload, or nil.
local function take_buffered(signals, name)
  local ids = redis.call('HGET', signals, 'q:' .. name)
  if not ids then return nil end
  local id, rest = string.match(ids, '^(%S+) ?(.*)$')
  if rest == '' then redis.call('HDEL', signals, 'q:' .. name) else redis.call('HSET', signals, 'q:' .. name, rest) end
  local payload = redis.call('HGET', signals, 'b:' .. id) or 'null'
  redis.call('HDEL', signals, 'b:' .. id)
  return id, payload
end

-- Hand signal `id` to the step `step` (visit `visit`) a waiting run goes on to: its payload
-- into the state field `into`, once (the caller moves the run on in the same script).
-- k: {state, signals, history, stats, delayed}
local function deliver(k, run_id, id, name, payload, into, step, visit, now)
  redis.call('HSET', k.state, into, payload)
  redis.call('HSET', k.signals, 'u:' .. id, step .. ':' .. visit)
  redis.call('ZREM', k.delayed, run_id)  -- the wait's timeout, if it had one
  redis.call('RPUSH', k.history, event({type = 'signalled', at = now, step = step, visit = visit, signal = name,
    signal_id = id}))
  count(k.stats, 'signals_delivered')
end

-- Step deadlines. A run submitted with any (`sd` set, `sd:<step>` a step's deadline_s in ms)
-- records when its current step was queued (`queued_ms`: 0 while it sleeps or waits for a
-- signal, not queued yet). It is in its partition's `deadlines` zset while it has a deadline,
-- scored by the earlier of its own (`deadline_ms`) and its queued step's (`queued_ms` +
-- `sd:<step>`): expire.lua fails it when the score comes.
local function step_due(run, step, queued)
  local ms = tonumber(redis.call('HGET', run, 'sd:' .. step)) or 0
  if queued > 0 and ms > 0 then return queued + ms end
  return nil
end

-- Re-index a run with step deadlines whose step is now `step`, queued at `queued` (0: not yet).
local function index_deadlines(deadlines, run, run_id, step, queued)
  local due = tonumber(redis.call('HGET', run, 'deadline_ms'))
  local step_at = step_due(run, step, queued)
  if step_at and (not due or step_at < due) then due = step_at end
  if due then redis.call('ZADD', deadlines, due, run_id) else redis.call('ZREM', deadlines, run_id) end
end

-- The run is (re)queued at `step` now: record it, for a run with step deadlines (`sd`).
local function step_queued(deadlines, run, run_id, step, now)
  if not redis.call('HGET', run, 'sd') then return end
  redis.call('HSET', run, 'queued_ms', now)
  index_deadlines(deadlines, run, run_id, step, now)
end

-- Runs linked to others (a child run, or a parent that started children: `notify` set) say
-- that they finished on their partition's `finished` stream, in the script that finishes them;
-- the supervisor relays it: to the parent (child_done.lua), and from a cancelled parent to its
-- children (cancel.lua on each).
local function announce(finished, run, run_id)
  if redis.call('HGET', run, 'notify') then redis.call('XADD', finished, '*', 'run', run_id) end
end

-- Child runs a commit starts (children_spec: a StartChildren or a Map as commit.lua takes it,
-- JSON or the table a step record holds) as {into, collect (bool), runs = {ids}, map (bool),
-- window (how many run at once; the whole list without one), specs (each child's submit, a
-- table, when given)}; nil when malformed.
local function children_spec(c)
  c = decoded(c)
  if type(c) ~= 'table' then return nil end
  local listed = c.runs or c.specs  -- a step record keeps each child's whole submit
  if type(c.into) ~= 'string' or c.into == '' or type(listed) ~= 'table' or #listed == 0 then return nil end
  local runs, specs = {}, nil
  for i, run in ipairs(listed) do
    if type(run) == 'table' then
      specs = specs or {}
      specs[i] = run
      run = run.run
    end
    if type(run) ~= 'string' or run == '' then return nil end
    runs[i] = run
  end
  local window = c.window or #runs
  if type(window) ~= 'number' or window < 1 or window ~= math.floor(window) then return nil end
  if c.map == true and not specs then return nil end  -- a map's later items are started from their specs
  return {into = c.into, collect = c.collect == true, runs = runs, map = c.map == true,
    window = math.min(window, #runs), specs = specs}
end

-- How long a parent waiting for its children is left between two looks of the sweep (ms; the
-- first comes sweep_after_s after it parked): the supervisor then checks each child itself (a
-- child not started, a notice lost).
local CHILDREN_LOOK_MS = 30000

-- How long a wait without a timeout is left before the sweep looks at it again (ms).
local WAIT_LOOK_MS = 86400000

-- Move a run whose step just got its result on to its next step (or finish it): the second
-- half of commit.lua, also used by claim.lua to finish a commit that stopped half-way.
-- Writes everything but the run hash; the run's new fields go into `set`, for the caller's
-- one HSET (written last, so that a commit which stops half-way leaves its result with the
-- run not moved on: claim.lua recognises that and finishes it).
-- k: {run, state, signals, history, stream, queued, active, done, dead, stats, detail, delayed, deadlines,
--    children, finished}
-- a: {run_id, wf, token (of the claim that committed), next ('' = end), max_steps, now,
--     seq (steps committed, this one included), visits (the next step's visits before this),
--     created_ms, wake (a Sleep's wake-up, wake_due(); '' or nil = go on at once),
--     wait (a WaitFor, wait_spec(); nil = none), children (a StartChildren, children_spec(); nil = none),
--     idem (the idempotency key of the step that committed)}
-- Returns {'OK', next step, visit, entry id}, {'OK', next step, visit, 'delayed', due ms} when
-- the run sleeps, {'OK', next step, visit, 'waiting', timeout ms or 0} when it waits for a
-- signal, {'OK', next step, visit, 'children', count} when it waits for child runs,
-- {'OK', '', 0, '', created ms, now} when the run completed, or
-- {'OK', '', 0, '', created ms, now, 'RUNAWAY'} when the run hit max_steps.
-- commit.lua writes the common case (the run goes on) out flat, for speed: keep them alike.
local function advance(k, a, set)
  set.claim, set.claim_fence, set.done_claim, set.updated_ms = '', 0, a.token, a.now
  set.attempt, set.errors, set.crashes = 0, 0, 0
  local function finish(status)
    set.status, set.dispatch, set.finished_ms = status, '', a.now
    unindex(k.active, k.queued, a.run_id)
    announce(k.finished, k.run, a.run_id)
  end
  if a.next == '' then
    finish('completed')
    redis.call('ZADD', k.done, a.now, a.run_id)
    redis.call('RPUSH', k.history, event({type = 'completed', at = a.now}))
    detail(k.detail, 1, 'runs', a.wf, 'completed')
    return {'OK', '', 0, '', a.created_ms, a.now}
  end
  local visit = a.visits + 1
  set['v:' .. a.next], set.step, set.visit = visit, a.next, visit
  -- a run with step deadlines: its next step's starts when it is queued, not while it sleeps or waits
  local deadlined = redis.call('HGET', k.run, 'sd')
  local function queued_at(at)
    if not deadlined then return end
    set.queued_ms = at
    index_deadlines(k.deadlines, k.run, a.run_id, a.next, at)
  end
  if a.max_steps > 0 and a.seq >= a.max_steps then
    -- a Goto loop that never ends: stop it before it grows history and results without bound
    local msg = 'run committed ' .. a.seq .. ' steps, the limit (max_run_steps); the next step would be ' ..
      a.next .. '. A Goto loop that never ends? Fix the loop, or raise ORCHESTRATOR_MAX_RUN_STEPS ' ..
      'on the workers, then retry the run.'
    -- the cursor moves to the next step, so a retry (after raising the limit) resumes there
    set.error = event({type = 'RunawayRun', message = msg, traceback = '', retryable = false})
    finish('failed')
    redis.call('ZADD', k.dead, a.now, a.run_id)
    redis.call('RPUSH', k.history, event({type = 'failed', at = a.now, detail = msg}))
    count(k.stats, 'runs_failed')
    count(k.stats, 'runaway_runs')
    detail(k.detail, 1, 'runs', a.wf, 'failed')
    return {'OK', '', 0, '', a.created_ms, a.now, 'RUNAWAY'}
  end
  if a.wake and a.wake ~= '' then
    -- a Sleep: no entry until the due time; promote.lua puts the step on the stream then
    local due = wake_due(a.wake, a.now)
    queued_at(0)
    redis.call('ZADD', k.delayed, due, a.run_id)
    set.dispatch, set.status, set.due_ms = 'delayed', 'sleeping', due
    index_active(k.active, k.queued, a.run_id, due)
    redis.call('RPUSH', k.history, event({type = 'sleeping', at = a.now, step = a.next, visit = visit, until_ms = due}))
    count(k.stats, 'sleeps')
    return {'OK', a.next, visit, 'delayed', due}
  end
  if a.children then
    -- parked until every child finished (child_done.lua); the caller starts them
    local c = a.children
    local fields = {'n', #c.runs, 'done', 0, 'into', c.into, 'collect', c.collect and 1 or 0,
      'from', a.idem, 'step', a.next, 'visit', visit, 'window', c.window, 'started', c.window}
    if c.map then
      fields[#fields + 1] = 'map'
      fields[#fields + 1] = 1
    end
    for i, run in ipairs(c.runs) do
      fields[#fields + 1] = 'c:' .. (i - 1)
      fields[#fields + 1] = run
      if c.map and i > c.window then
        -- a map item past the window: started (from this) when an earlier one finishes
        fields[#fields + 1] = 'p:' .. (i - 1)
        fields[#fields + 1] = cjson.encode(c.specs[i])
      end
    end
    redis.call('DEL', k.children)  -- a park before this one (a loop) was settled
    redis.call('HSET', k.children, unpack(fields))
    queued_at(0)
    set.dispatch, set.status, set.due_ms, set.notify = 'children', 'waiting', 0, 1
    index_active(k.active, k.queued, a.run_id, a.now)  -- a first look soon: were the children started?
    local listed = #c.runs <= 10 and table.concat(c.runs, ', ') or (c.runs[1] .. ' ... ' .. c.runs[#c.runs])
    redis.call('RPUSH', k.history, event({type = 'children', at = a.now, step = a.next, visit = visit,
      detail = #c.runs .. (c.map and ' map items' or ' child runs') ..
        (c.window < #c.runs and ' (' .. c.window .. ' at a time)' or '') .. ': ' .. listed}))
    count(k.stats, c.map and 'map_items' or 'children_started', #c.runs)
    return {'OK', a.next, visit, 'children', #c.runs}
  end
  if a.wait then
    local id, payload = take_buffered(k.signals, a.wait.signal)
    if id then
      -- the signal came before the wait: delivered now, and the run goes on at once
      deliver(k, a.run_id, id, a.wait.signal, payload, a.wait.into, a.next, visit, a.now)
    else
      -- parked: no entry, no claim; signal.lua moves it on, promote.lua at its timeout
      queued_at(0)
      local due = a.wait.timeout_ms > 0 and a.now + a.wait.timeout_ms or 0
      if due > 0 then redis.call('ZADD', k.delayed, due, a.run_id) end
      set.dispatch, set.status, set.due_ms, set.wait_ms = 'signal', 'waiting', due, a.now
      set.wait_signal, set.wait_into, set.wait_on_timeout = a.wait.signal, a.wait.into, a.wait.on_timeout
      index_active(k.active, k.queued, a.run_id, due > 0 and due or a.now + WAIT_LOOK_MS)
      redis.call('RPUSH', k.history, event({type = 'waiting', at = a.now, step = a.next, visit = visit,
        signal = a.wait.signal, until_ms = due > 0 and due or nil}))
      count(k.stats, 'waits')
      return {'OK', a.next, visit, 'waiting', due}
    end
  end
  local id = redis.call('XADD', k.stream, '*', 'run', a.run_id, 'wf', a.wf, 'step', a.next, 'visit', visit)
  set.dispatch, set.status = id, 'running'
  queued_at(a.now)
  index_queued(k.active, k.queued, a.run_id, id)
  return {'OK', a.next, visit, id}
end
