-- Commit a step: persist its record under the idempotency key (never overwriting), merge its
-- update into the state, advance the run and enqueue the next step, all or nothing. The
-- caller XACKs the stream entry afterwards; a crash in between only causes a duplicate
-- delivery, which claim.lua answers with DUP.
-- KEYS[1] run  KEYS[2] state  KEYS[3] results  KEYS[4] stash  KEYS[5] history  KEYS[6] lease
-- KEYS[7] stream  KEYS[8] active  KEYS[9] done  KEYS[10] stats  KEYS[11] stats detail
-- ARGV[1] run id  ARGV[2] workflow  ARGV[3] idempotency key  ARGV[4] claim token
-- ARGV[5] step record JSON  ARGV[6] attempt event body (JSON object)  ARGV[7] next step, '' = end
-- ARGV[8] step duration ms  ARGV[9] step name  ARGV[10] cost JSON object ('' when none)
-- ARGV[11] consumer to chain the next step to ('' = none)  ARGV[12] lease ms  ARGV[13] group
-- ARGV[14..] state field, JSON value pairs
-- Chaining: when ARGV[11] names a consumer and no other entry of the stream waits undelivered,
-- the next step's entry is delivered to that consumer and claimed for it right here (what
-- XREADGROUP + claim.lua would do a round trip later), so a run moves on without a trip
-- through the queue. The entry is pending for the consumer like any delivered one: if it dies,
-- the supervisor re-dispatches it when the lease runs out. Never when others wait: no queue
-- jumping.
-- Returns {'OK', next step, visit, entry id} ({'OK', '', 0, '', created ms, now ms} when the run
--   completed; {'OK', next step, visit, entry id, <claim.lua's RUN reply>} when chained) or
--   {'REPLAY'} (this very commit was already applied: same record; when that commit chained
--   the next step to ARGV[11] and the claim is still live, the same claim again, as for OK) |
--   {'FENCED', fence of the live claim} (this claim was replaced: another claim holds the step
--   or already committed it) | {'TERMINAL', status} | {'MISSING'}

-- Deliver stream entry `id` to `consumer` of `group` if it is the first undelivered entry
-- (nothing queued before it); true when it did. XREADGROUP inside a script never blocks.
local function deliver_if_next(stream, group, consumer, id)
  local last
  for _, info in ipairs(redis.call('XINFO', 'GROUPS', stream)) do
    local g = {}
    for i = 1, #info, 2 do g[info[i]] = info[i + 1] end
    if g['name'] == group then last = g['last-delivered-id'] end
  end
  if not last then return false end
  local first = redis.call('XRANGE', stream, '(' .. last, '+', 'COUNT', 1)[1]
  if not first or first[1] ~= id then return false end
  local got = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', 1, 'STREAMS', stream, '>')
  return got[1][2][1][1] == id
end

-- claim.lua's RUN reply for the step this commit chained, after the commit's own fields
local function with_claim(code, step, visit, id, fence, attempt, now)
  local run = redis.call('HMGET', KEYS[1], 'seq', 'work_ms')
  local out = {code, step, visit, id, 'RUN', fence, attempt, 0, 0, 0, 0, '', now, tonumber(run[1]), tonumber(run[2])}
  local state = redis.call('HGETALL', KEYS[2])
  for i = 1, #state do table.insert(out, state[i]) end
  return out
end

local r = redis.call('HMGET', KEYS[1], 'status', 'claim', 'claim_fence', 'fence')
if not r[1] then return {'MISSING'} end
local stored = redis.call('HGET', KEYS[3], ARGV[3])
if stored == ARGV[5] then
  -- our commit, resent after its reply was lost: hand back its chained claim if still ours
  local c = redis.call('HMGET', KEYS[1], 'claim', 'dispatch', 'step', 'visit', 'claim_fence', 'attempt')
  if ARGV[11] ~= '' and c[1] == ARGV[11] .. ':' .. (c[2] or '') and c[3] == ARGV[7]
      and redis.call('PTTL', KEYS[6]) > 0 then
    return with_claim('REPLAY', c[3], tonumber(c[4]), c[2], tonumber(c[5]), tonumber(c[6]), now_ms())
  end
  return {'REPLAY'}
end
if not stored and TERMINAL[r[1]] then return {'TERMINAL', r[1]} end
local now = now_ms()
if stored or r[2] ~= ARGV[4] then
  -- a claim is only issued while no result exists, so a result written by someone else, or
  -- a different live claim, both mean this claim was replaced while it ran
  redis.call('HINCRBY', KEYS[1], 'fenced', 1)
  redis.call('RPUSH', KEYS[5], stamp('fenced', ARGV[6], now))
  count(KEYS[10], 'fenced')
  detail(KEYS[11], 1, 'steps', ARGV[2], ARGV[9], 'fenced')
  return {'FENCED', tonumber(r[3])}
end

redis.call('HSET', KEYS[3], ARGV[3], ARGV[5])
for i = 14, #ARGV, 2 do
  redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
end
if ARGV[10] ~= '' then
  for unit, amount in pairs(cjson.decode(ARGV[10])) do
    redis.call('HINCRBYFLOAT', KEYS[1], 'cost:' .. unit, amount)
    redis.call('HINCRBYFLOAT', KEYS[11], 'cost|' .. ARGV[2] .. '|' .. ARGV[9] .. '|' .. unit, amount)
  end
end
redis.call('HDEL', KEYS[4], ARGV[3])
redis.call('DEL', KEYS[6])
redis.call('HINCRBY', KEYS[1], 'seq', 1)
redis.call('HINCRBY', KEYS[1], 'work_ms', ARGV[8])
redis.call('RPUSH', KEYS[5], stamp('ok', ARGV[6], now))
count(KEYS[10], 'steps_ok')
detail(KEYS[11], 1, 'steps', ARGV[2], ARGV[9], 'ok')
redis.call('HSET', KEYS[1], 'claim', '', 'claim_fence', 0, 'done_claim', ARGV[4], 'attempt', 0,
  'errors', 0, 'crashes', 0, 'updated_ms', now)

if ARGV[7] == '' then
  redis.call('HSET', KEYS[1], 'status', 'completed', 'dispatch', '', 'finished_ms', now)
  redis.call('ZREM', KEYS[8], ARGV[1])
  redis.call('ZADD', KEYS[9], now, ARGV[1])
  redis.call('RPUSH', KEYS[5], event({type = 'completed', at = now}))
  count(KEYS[10], 'runs_completed')
  detail(KEYS[11], 1, 'runs', ARGV[2], 'completed')
  return {'OK', '', 0, '', tonumber(redis.call('HGET', KEYS[1], 'created_ms')), now}
end
local visit = redis.call('HINCRBY', KEYS[1], 'v:' .. ARGV[7], 1)
local id = redis.call('XADD', KEYS[7], '*', 'run', ARGV[1], 'wf', ARGV[2], 'step', ARGV[7], 'visit', visit)
redis.call('HSET', KEYS[1], 'step', ARGV[7], 'visit', visit, 'dispatch', id, 'status', 'running')
redis.call('ZADD', KEYS[8], now, ARGV[1])
if ARGV[11] == '' or not deliver_if_next(KEYS[7], ARGV[13], ARGV[11], id) then
  return {'OK', ARGV[7], visit, id}
end
-- claim.lua for a fresh dispatch: no previous claim, attempt 1, no stash for a new visit
local token = ARGV[11] .. ':' .. id
local fence = math.max(tonumber(r[4] or 0) + 1, now)
redis.call('HSET', KEYS[1], 'attempt', 1, 'fence', string.format('%d', fence), 'claim', token,
  'claim_fence', string.format('%d', fence), 'claim_worker', ARGV[11], 'claim_ms', now)
redis.call('SET', KEYS[6], token, 'PX', ARGV[12])
return with_claim('OK', ARGV[7], visit, id, fence, 1, now)
