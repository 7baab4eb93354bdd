-- Record how one of a parent's child runs ended, once, and move the parent on when it was the
-- last: the supervisor calls it for each notice on a child's partition's `finished` stream
-- (announce() in _prelude.lua), and for each finished child it finds when it checks a waiting
-- parent itself (the sweep). The parent's `children` hash (keys.py) lists its children by index.
-- KEYS[1] parent run  KEYS[2] parent state  KEYS[3] children  KEYS[4] history  KEYS[5] stream
-- KEYS[6] queued  KEYS[7] active  KEYS[8] dead  KEYS[9] stats  KEYS[10] stats detail
-- KEYS[11] deadlines  KEYS[12] finished
-- ARGV[1] parent run id  ARGV[2] child index  ARGV[3] child run id  ARGV[4] child status
-- (completed, failed or cancelled)  ARGV[5] the child's result (a ChildResult, JSON)
-- Returns {'DONE', step, visit} (the last child: the parent goes on) | {'FAILED', child id} (the
--   last child, and one failed without collect_failures: so does the parent) |
--   {'RECORDED', done, count} | {'DUP', done, count} (this child's result is there already) |
--   {'STALE'} (not a child of the parent's current wait) | {'MISSING'}
local r = redis.call('HMGET', KEYS[1], 'status', 'wf', 'step', 'visit', 'dispatch')
if not r[1] then return {'MISSING'} end
if redis.call('HGET', KEYS[3], 'c:' .. ARGV[2]) ~= ARGV[3] then return {'STALE'} end
local now = now_ms()
local known = redis.call('HEXISTS', KEYS[3], 'r:' .. ARGV[2]) == 1
if not known then
  redis.call('HSET', KEYS[3], 'r:' .. ARGV[2], ARGV[5], 's:' .. ARGV[2], ARGV[4])
  redis.call('HINCRBY', KEYS[3], 'done', 1)
end
local c = redis.call('HMGET', KEYS[3], 'n', 'into', 'collect', 'done')
local n, done = tonumber(c[1]), tonumber(c[4])
if not known then
  redis.call('RPUSH', KEYS[4], event({type = 'child', at = now, step = r[3], visit = tonumber(r[4]),
    detail = 'child run ' .. ARGV[3] .. ' ' .. ARGV[4] .. ' (' .. done .. ' of ' .. n .. ')'}))
end
-- the last result (or one seen again once all are there: a parent retried, a notice repeated)
-- settles a parent still waiting for its children
if r[1] ~= 'waiting' or r[5] ~= 'children' or done < n then return {known and 'DUP' or 'RECORDED', done, n} end

local results, failed = {}, nil
for i = 0, n - 1 do
  results[#results + 1] = redis.call('HGET', KEYS[3], 'r:' .. i)
  if not failed and redis.call('HGET', KEYS[3], 's:' .. i) ~= 'completed' then failed = i end
end
if failed and c[3] ~= '1' then
  local child = redis.call('HGET', KEYS[3], 'c:' .. failed)
  local ok, result = pcall(cjson.decode, redis.call('HGET', KEYS[3], 'r:' .. failed))
  local why = redis.call('HGET', KEYS[3], 's:' .. failed)
  if ok and type(result) == 'table' and type(result['error']) == 'table' then
    why = why .. ': ' .. tostring(result['error']['type']) .. ': ' .. tostring(result['error']['message'])
  end
  local msg = 'child run ' .. child .. ' ' .. why .. '; `orchestrator retry` of this run re-drives its failed children'
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
  detail = n .. ' child runs finished'}))
return {'DONE', r[3], tonumber(r[4])}
