-- Give back a claimed step that may not start yet (its rate limit said wait, or its concurrency
-- limit has no permit free): the run waits in its queue's delayed set until `due` with no claim,
-- no entry and no worker slot, and the first promote after that queues the step again (a permit
-- waiter is woken earlier, when a permit is free for it: promote.lua with the limit's name). No user code ran: no error is counted and the
-- attempt number is given back, so the next claim is the same attempt again. The caller XACKs
-- the entry afterwards.
-- KEYS[1] run  KEYS[2] history  KEYS[3] delayed  KEYS[4] queued  KEYS[5] active  KEYS[6] stats
-- ARGV[1] run id  ARGV[2] claim token  ARGV[3] wait ms  ARGV[4] the limit's name
-- ARGV[5] 'rate' | 'permit' (what the step waits for)  ARGV[6] what the limit said (for history)
-- Returns {'DEFERRED', due ms} | {'REPLAY'} (this very call applied already) |
--   {'TERMINAL', status} | {'FENCED', fence of the live claim} | {'MISSING'} | {'INVALID', reason}
-- Races: as fail.lua's retry: a claim replaced meanwhile (the supervisor re-dispatched it, a
-- cancel) is FENCED or TERMINAL and writes nothing; a resent call finds done_claim = its token.
local r = redis.call('HMGET', KEYS[1], 'status', 'claim', 'claim_fence', 'done_claim', 'step', 'visit', 'attempt')
if not r[1] then return {'MISSING'} end
local wait = tonumber(ARGV[3])
if not wait or wait < 0 or wait ~= math.floor(wait) then return {'INVALID', 'wait ' .. ARGV[3] .. ' is not whole ms'} end
local permit = ARGV[5] == 'permit'
if not permit and ARGV[5] ~= 'rate' then return {'INVALID', 'kind ' .. tostring(ARGV[5]) .. ': expected rate or permit'} end
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
if permit then redis.call('HSET', KEYS[1], 'wait_permit', ARGV[4]) end  -- promote.lua deletes it
index_active(KEYS[5], KEYS[4], ARGV[1], due)
redis.call('RPUSH', KEYS[2], event({type = permit and 'permit_wait' or 'rate_limited', at = now, step = r[5],
  visit = tonumber(r[6]), until_ms = due, detail = ARGV[6]}))
count(KEYS[6], permit and 'permit_waits' or 'rate_limited')
return {'DEFERRED', due}
