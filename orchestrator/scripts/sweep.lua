-- Supervisor: check that an unfinished run has work somewhere (a live lease, a queued or
-- pending stream entry, a scheduled retry) and enqueue its current step if not. Covers writes
-- lost by Redis, trimmed streams and entries acked without progress.
-- KEYS[1] run  KEYS[2] lease  KEYS[3] stream  KEYS[4] delayed  KEYS[5] active  KEYS[6] history
-- KEYS[7] stats
-- ARGV[1] run id  ARGV[2] group
-- Returns {'ALIVE'} | {'QUEUED'} | {'SCHEDULED'} | {'TERMINAL'} | {'GONE'} | {'REPAIRED', entry id, reason}
local r = redis.call('HMGET', KEYS[1], 'status', 'dispatch', 'step', 'visit', 'wf')
if not r[1] then
  redis.call('ZREM', KEYS[5], ARGV[1])
  return {'GONE'}
end
if TERMINAL[r[1]] then
  redis.call('ZREM', KEYS[5], ARGV[1])
  return {'TERMINAL'}
end
local now = now_ms()
if redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('ZADD', KEYS[5], now, ARGV[1])
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

local reason
if r[2] == 'delayed' then
  if redis.call('ZSCORE', KEYS[4], ARGV[1] .. '|' .. r[3] .. '|' .. r[4]) then
    redis.call('ZADD', KEYS[5], now, ARGV[1])
    return {'SCHEDULED'}
  end
  reason = 'scheduled retry missing'
elseif r[2] ~= '' and #redis.call('XRANGE', KEYS[3], r[2], r[2]) > 0 then
  if #redis.call('XPENDING', KEYS[3], ARGV[2], r[2], r[2], 1) > 0 then
    redis.call('ZADD', KEYS[5], now, ARGV[1])
    return {'QUEUED'}
  end
  local undelivered = true
  for _, group in ipairs(redis.call('XINFO', 'GROUPS', KEYS[3])) do
    for i = 1, #group, 2 do
      if group[i] == 'name' and group[i + 1] == ARGV[2] then
        for j = 1, #group, 2 do
          if group[j] == 'last-delivered-id' then undelivered = after(r[2], group[j + 1]) end
        end
      end
    end
  end
  if undelivered then
    redis.call('ZADD', KEYS[5], now, ARGV[1])
    return {'QUEUED'}
  end
  redis.call('XDEL', KEYS[3], r[2])
  reason = 'entry acked without progress'
else
  reason = 'no queued entry'
end
local id = redis.call('XADD', KEYS[3], '*', 'run', ARGV[1], 'wf', r[5], 'step', r[3], 'visit', r[4])
local status = r[1]
if status == 'retrying' then status = 'running' end
redis.call('HSET', KEYS[1], 'dispatch', id, 'status', status, 'updated_ms', now)
redis.call('ZADD', KEYS[5], now, ARGV[1])
redis.call('RPUSH', KEYS[6], event({type = 'repaired', at = now, step = r[3], visit = tonumber(r[4]),
  detail = reason}))
count(KEYS[7], 'repaired')
return {'REPAIRED', id, reason}
