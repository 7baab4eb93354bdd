-- Supervisor: drop a stream's finished entries, the ones before both its oldest pending entry
-- and its first undelivered one: each was delivered and acked, and nothing reads it again.
-- Commits only XACK their entry: an XDEL per step cost Redis more than the rest of the ack
-- (deleting a stream's first entry makes Redis walk the deleted ones to find the next live
-- one), while one XTRIM per tick drops whole runs of entries at once.
-- Only the group named here is looked at: a queue's stream has no other reader.
-- KEYS[1] stream  ARGV[1] group
-- Returns how many entries were dropped (0 when the stream or its group is gone: without the
-- group nothing is known to be delivered).
local g = group_info(KEYS[1], ARGV[1])
if not g then return 0 end
local ms, seq = string.match(g['last-delivered-id'], '^(%d+)-(%d+)$')
if not ms then return 0 end
-- everything up to the last delivered entry, i.e. before the id right after it
local before = ms .. '-' .. string.format('%d', tonumber(seq) + 1)
local pending = redis.call('XPENDING', KEYS[1], ARGV[1])
if pending[1] > 0 then
  local pms, pseq = string.match(pending[2], '^(%d+)-(%d+)$')
  local bms, bseq = tonumber(ms), tonumber(seq) + 1
  if tonumber(pms) < bms or (tonumber(pms) == bms and tonumber(pseq) < bseq) then before = pending[2] end
end
return redis.call('XTRIM', KEYS[1], 'MINID', before)
