-- Give back a claimed step that may not start yet (its rate limit said wait): the run waits in
-- its queue's delayed set until `due` with no claim, no entry and no worker slot, and the first
-- promote after that queues the step again. No user code ran: no error is counted and the
-- attempt number is given back, so the next claim is the same attempt again. The caller XACKs
-- the entry afterwards.
-- KEYS[1] run  KEYS[2] history  KEYS[3] delayed  KEYS[4] queued  KEYS[5] active  KEYS[6] stats
-- ARGV[1] run id  ARGV[2] claim token  ARGV[3] wait ms  ARGV[4] the limit's name
-- Returns {'DEFERRED', due ms} | {'REPLAY'} (this very call applied already) |
--   {'TERMINAL', status} | {'FENCED', fence of the live claim} | {'MISSING'} | {'INVALID', reason}
-- Races: as fail.lua's retry: a claim replaced meanwhile (the supervisor re-dispatched it, a
-- cancel) is FENCED or TERMINAL and writes nothing; a resent call finds done_claim = its token.
local r = redis.call('HMGET', KEYS[1], 'status', 'claim', 'claim_fence', 'done_claim', 'step', 'visit', 'attempt')
if not r[1] then return {'MISSING'} end
local wait = tonumber(ARGV[3])
if not wait or wait < 0 or wait ~= math.floor(wait) then return {'INVALID', 'wait ' .. ARGV[3] .. ' is not whole ms'} end
if r[2] ~= ARGV[2] then
  if r[4] == ARGV[2] then return {'REPLAY'} end
  if TERMINAL[r[1]] then return {'TERMINAL', r[1]} end
  return {'FENCED', tonumber(r[3])}
end
local now = now_ms()
local due = now + wait
redis.call('ZADD', KEYS[3], due, ARGV[1])
redis.call('HSET', KEYS[1], 'status', 'retrying', 'dispatch', 'delayed', 'due_ms', due, 'claim', '', 'claim_fence', 0,
  'done_claim', ARGV[2], 'updated_ms', now, 'attempt', math.max(0, (tonumber(r[7]) or 1) - 1))
index_active(KEYS[5], KEYS[4], ARGV[1], due)
redis.call('RPUSH', KEYS[2], event({type = 'rate_limited', at = now, step = r[5], visit = tonumber(r[6]),
  until_ms = due, detail = 'rate limit ' .. ARGV[4] .. ': starts in ' .. wait .. ' ms'}))
count(KEYS[6], 'rate_limited')
return {'DEFERRED', due}
