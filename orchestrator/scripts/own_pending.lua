-- A worker's audit of one stream (orchestrator/worker/audit.py): the entries pending for it
-- and idle for a lease, but only when Redis holds more for it than it knows of (one summary
-- read: the common case costs the same however many steps the worker holds).
-- KEYS[1] stream  ARGV[1] group  ARGV[2] consumer (the worker)  ARGV[3] entries it knows of here
-- ARGV[4] idle ms  ARGV[5] at most this many
-- Returns the entry ids (none when the counts agree).
local summary = redis.pcall('XPENDING', KEYS[1], ARGV[1])
if summary.err or not summary[4] then return {} end
local held = 0
for _, row in ipairs(summary[4]) do
  if row[1] == ARGV[2] then held = tonumber(row[2]) end
end
if held <= tonumber(ARGV[3]) then return {} end
local out = {}
for _, row in ipairs(redis.call('XPENDING', KEYS[1], ARGV[1], 'IDLE', ARGV[4], '-', '+', ARGV[5], ARGV[2])) do
  out[#out + 1] = row[1]
end
return out
