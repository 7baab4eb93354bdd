-- Record how one of a parent's child runs (or map items) ended, once, and move the parent on
-- when it was the last: called for each notice on a child's partition's `finished` stream
-- (announce() in _prelude.lua) by the supervisor, for a map item by the worker that finished it
-- (at once, before the notice is read), and for each finished child the sweep finds when it
-- checks a waiting parent itself. The parent's `children` hash (keys.py) lists its children by
-- index. Every call also tops up a map's window: the items to start now (`started` moves on
-- here, once; the caller submits them, and the sweep submits any listed below `started` that a
-- caller died before submitting).
-- KEYS[1] parent run  KEYS[2] parent state  KEYS[3] children  KEYS[4] history  KEYS[5] stream
-- KEYS[6] queued  KEYS[7] active  KEYS[8] dead  KEYS[9] stats  KEYS[10] stats detail
-- KEYS[11] deadlines  KEYS[12] finished
-- ARGV[1] parent run id  ARGV[2] child index  ARGV[3] child run id  ARGV[4] child status
-- (completed, failed or cancelled)  ARGV[5] the child's result (a ChildResult, or for a map item
-- an ItemResult, JSON)  ARGV[6] a completed map item's value (JSON; '' for a child run)
-- Returns {'DONE', step, visit} (the last child: the parent goes on) | {'FAILED', child id} (the
--   last child, and one failed without collect_failures: so does the parent; a map's first
--   failed item fails it at once) |
--   {'RECORDED', done, count, index to start...} | {'DUP', done, count, index to start...} (this
--   child's result is there already) | {'STALE'} (not a child of the parent's current wait) |
--   {'IGNORED'} (a child that did not complete, of a parent that no longer waits) | {'MISSING'}
-- Races: two callers for one child (the worker and the relay, or the sweep) record it once
-- (r:<i> is written only when absent) and start each item once (`started` moves in one script);
-- a retry of the parent (retry_run.lua) drops the results of the children it re-drives, so
-- their second outcome is recorded anew.
local r = redis.call('HMGET', KEYS[1], 'status', 'wf', 'step', 'visit', 'dispatch')
if not r[1] then return {'MISSING'} end
if redis.call('HGET', KEYS[3], 'c:' .. ARGV[2]) ~= ARGV[3] then return {'STALE'} end
local now = now_ms()
local c = redis.call('HMGET', KEYS[3], 'n', 'into', 'collect', 'done', 'map', 'window', 'started')
local n, map, collect = tonumber(c[1]), c[5] == '1', c[3] == '1'
local known = redis.call('HEXISTS', KEYS[3], 'r:' .. ARGV[2]) == 1
local done = tonumber(c[4])
local waiting = r[1] == 'waiting' and r[5] == 'children'
-- a parent that failed or was cancelled keeps only completed results: a child cancelled by its
-- cascade, or failed meanwhile, is re-driven by a retry of the parent (Client.retry finds it),
-- and a late notice of it must not fail the parent that retry re-parked
if not known and not waiting and ARGV[4] ~= 'completed' then return {'IGNORED'} end
if not known then
  -- a map without collect_failures gets the plain values of its items (all completed)
  local result = (map and not collect and ARGV[4] == 'completed') and ARGV[6] or ARGV[5]
  redis.call('HSET', KEYS[3], 'r:' .. ARGV[2], result, 's:' .. ARGV[2], ARGV[4])
  done = redis.call('HINCRBY', KEYS[3], 'done', 1)
  redis.call('RPUSH', KEYS[4], event({type = 'child', at = now, step = r[3], visit = tonumber(r[4]),
    detail = (map and 'map item ' or 'child run ') .. ARGV[3] .. ' ' .. ARGV[4] .. ' (' .. done .. ' of ' .. n .. ')'}))
end
local outcome = known and redis.call('HGET', KEYS[3], 's:' .. ARGV[2]) or ARGV[4]
local fail_now = waiting and map and not collect and outcome ~= 'completed'
if waiting and done < n and not fail_now then
  -- a map's window: start the next items while fewer than `window` run
  local started, window = tonumber(c[7] or n), tonumber(c[6] or n)
  local out = {known and 'DUP' or 'RECORDED', done, n}
  while started < n and started - done < window do
    out[#out + 1] = started
    started = started + 1
  end
  if #out > 3 then redis.call('HSET', KEYS[3], 'started', started) end
  return out
end
-- the last result (or one seen again once all are there: a parent retried, a notice repeated)
-- settles a parent still waiting for its children; a map's failed item settles it at once
if not waiting or (done < n and not fail_now) then return {known and 'DUP' or 'RECORDED', done, n} end

local results, failed = {}, nil
if fail_now then
  failed = tonumber(ARGV[2])
else
  for i = 0, n - 1 do
    results[#results + 1] = redis.call('HGET', KEYS[3], 'r:' .. i)
    if not failed and redis.call('HGET', KEYS[3], 's:' .. i) ~= 'completed' then failed = i end
  end
end
if failed and not collect then
  local child = redis.call('HGET', KEYS[3], 'c:' .. failed)
  local ok, result = pcall(cjson.decode, redis.call('HGET', KEYS[3], 'r:' .. failed))
  local why = redis.call('HGET', KEYS[3], 's:' .. failed)
  if ok and type(result) == 'table' and type(result['error']) == 'table' then
    why = why .. ': ' .. tostring(result['error']['type']) .. ': ' .. tostring(result['error']['message'])
  end
  local msg = (map and 'map item ' or 'child run ') .. child .. ' ' .. why ..
    '; `orchestrator retry` of this run re-drives its failed children'
  redis.call('HSET', KEYS[1], 'status', 'failed', 'dispatch', '', 'finished_ms', now, 'updated_ms', now,
    'children_failed', 1, 'error', event({type = 'ChildFailed', message = msg, traceback = '', retryable = false}))
  unindex(KEYS[7], KEYS[6], ARGV[1])
  redis.call('ZADD', KEYS[8], now, ARGV[1])
  redis.call('RPUSH', KEYS[4], event({type = 'failed', at = now, step = r[3], visit = tonumber(r[4]), detail = msg}))
  count(KEYS[9], 'runs_failed')
  detail(KEYS[10], 1, 'runs', r[2], 'failed')
  announce(KEYS[12], KEYS[1], ARGV[1])
  return {'FAILED', child}
end
redis.call('HSET', KEYS[2], c[2], '[' .. table.concat(results, ',') .. ']')
redis.call('HSET', KEYS[3], 'settled', 1)
local id = redis.call('XADD', KEYS[5], '*', 'run', ARGV[1], 'wf', r[2], 'step', r[3], 'visit', r[4])
redis.call('HSET', KEYS[1], 'status', 'running', 'dispatch', id, 'updated_ms', now)
index_queued(KEYS[7], KEYS[6], ARGV[1], id)
step_queued(KEYS[11], KEYS[1], ARGV[1], r[3], now)
redis.call('RPUSH', KEYS[4], event({type = 'children_done', at = now, step = r[3], visit = tonumber(r[4]),
  detail = n .. (map and ' map items finished' or ' child runs finished')}))
return {'DONE', r[3], tonumber(r[4])}
