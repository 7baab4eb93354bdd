-- Supervisor: check that an unfinished run has work somewhere (a live claim, a queued or
-- pending stream entry, a scheduled retry or wake-up) and enqueue its current step if not. Covers writes
-- lost by Redis, trimmed or deleted streams and entries acked without progress. Also puts the
-- run back in the index it belongs in (see keys.py), so the indexes heal too.
-- KEYS[1] run  KEYS[2] alive  KEYS[3] stream  KEYS[4] delayed  KEYS[5] queued  KEYS[6] active
-- KEYS[7] history  KEYS[8] stats
-- ARGV[1] run id  ARGV[2] group  ARGV[3] sweep after ms (how long a run is left before a look)
-- ARGV[4] the longest a live claim is left between two looks (ms)
-- Returns {'ALIVE'} | {'QUEUED'} | {'SCHEDULED'} | {'WAITING'} | {'CHILDREN'} (waiting for child
--   runs: the caller checks them) | {'TERMINAL'} | {'GONE'} |
--   {'REPAIRED', entry id, reason} (entry id '' when a sleeping run's lost wake-up, or a waiting
--   run's lost timeout, was scheduled again)
local r = redis.call('HMGET', KEYS[1], 'status', 'dispatch', 'step', 'visit', 'wf', 'claim', 'claim_worker', 'claim_ms')
if not r[1] or TERMINAL[r[1]] then
  unindex(KEYS[6], KEYS[5], ARGV[1])
  return {r[1] and 'TERMINAL' or 'GONE'}
end
local now = now_ms()
if r[6] and r[6] ~= '' and live(KEYS[2], r[7], now) then
  -- look again after as long as the claim has run (at least sweep after, at most ARGV[4]): a
  -- step that waits an hour on an LLM costs a dozen looks, not one every sweep after
  local after = tonumber(ARGV[3])
  local wait = math.min(math.max(now - (tonumber(r[8]) or now), after), tonumber(ARGV[4]))
  index_active(KEYS[6], KEYS[5], ARGV[1], now + wait - after)
  return {'ALIVE'}
end

local function id_parts(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq)
end
local function after(a, b)
  local ams, aseq = id_parts(a)
  local bms, bseq = id_parts(b)
  return ams > bms or (ams == bms and aseq > bseq)
end
-- the entry is there and waits or is pending: put the run where it belongs and leave it
local function queued()
  if r[6] ~= '' then index_active(KEYS[6], KEYS[5], ARGV[1], now) else index_queued(KEYS[6], KEYS[5], ARGV[1], r[2]) end
  return {'QUEUED'}
end

local reason
if r[1] == 'waiting' and r[2] == 'children' then
  -- the supervisor checks each child itself (one not started, a notice lost): child_done.lua
  index_active(KEYS[6], KEYS[5], ARGV[1], now + CHILDREN_LOOK_MS)
  return {'CHILDREN'}
end
if r[1] == 'waiting' then
  -- parked until a signal comes (signal.lua) or its timeout (promote.lua): nothing to dispatch
  local due = tonumber(redis.call('HGET', KEYS[1], 'due_ms')) or 0
  if due <= 0 then
    index_active(KEYS[6], KEYS[5], ARGV[1], now + WAIT_LOOK_MS)
    return {'WAITING'}
  end
  index_active(KEYS[6], KEYS[5], ARGV[1], math.max(now, due))
  if redis.call('ZSCORE', KEYS[4], ARGV[1]) then return {'SCHEDULED'} end
  -- the timeout is gone (Redis lost writes): schedule it again, never earlier
  redis.call('ZADD', KEYS[4], math.max(now, due), ARGV[1])
  reason = 'scheduled wait timeout missing'
  redis.call('RPUSH', KEYS[7], event({type = 'repaired', at = now, step = r[3], visit = tonumber(r[4]),
    detail = reason}))
  count(KEYS[8], 'repaired')
  return {'REPAIRED', '', reason}
end
if r[2] == 'delayed' then
  local due = redis.call('ZSCORE', KEYS[4], ARGV[1])
  if due then
    -- looked at again once it is overdue (a sleep of a day costs one look, not one per sweep)
    index_active(KEYS[6], KEYS[5], ARGV[1], math.max(now, tonumber(due)))
    return {'SCHEDULED'}
  end
  if r[1] == 'sleeping' then
    -- the wake-up is gone (Redis lost writes): schedule it again at its due time, never earlier
    local at = math.max(now, tonumber(redis.call('HGET', KEYS[1], 'due_ms')) or now)
    redis.call('ZADD', KEYS[4], at, ARGV[1])
    index_active(KEYS[6], KEYS[5], ARGV[1], at)
    reason = 'scheduled wake-up missing'
    redis.call('RPUSH', KEYS[7], event({type = 'repaired', at = now, step = r[3], visit = tonumber(r[4]),
      detail = reason}))
    count(KEYS[8], 'repaired')
    return {'REPAIRED', '', reason}
  end
  reason = 'scheduled retry missing'
elseif r[2] ~= '' and #redis.call('XRANGE', KEYS[3], r[2], r[2]) > 0 then
  local g = group_info(KEYS[3], ARGV[2])
  local last = g and g['last-delivered-id']
  -- no group (lost with Redis' data): the supervisor recreates it from the stream's start
  if not last or after(r[2], last) then return queued() end
  if #redis.call('XPENDING', KEYS[3], ARGV[2], r[2], r[2], 1) > 0 then return queued() end
  redis.call('XDEL', KEYS[3], r[2])
  reason = 'entry acked without progress'
else
  reason = 'no queued entry'
end
local id = redis.call('XADD', KEYS[3], '*', 'run', ARGV[1], 'wf', r[5], 'step', r[3], 'visit', r[4])
local status = r[1]
if status == 'retrying' then status = 'running' end
redis.call('HSET', KEYS[1], 'dispatch', id, 'status', status, 'updated_ms', now)
index_queued(KEYS[6], KEYS[5], ARGV[1], id)
redis.call('RPUSH', KEYS[7], event({type = 'repaired', at = now, step = r[3], visit = tonumber(r[4]),
  detail = reason}))
count(KEYS[8], 'repaired')
return {'REPAIRED', id, reason}
