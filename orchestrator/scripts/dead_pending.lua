-- Supervisor: the entries of one stream pending for workers whose deadline has passed (killed,
-- frozen, cut off), read only for those workers: the cost grows with the workers, not with the
-- steps in flight. A worker whose deadline is ahead keeps its entries; one that loses track of
-- an entry gives it up itself (redispatch.lua, from its own audit).
-- KEYS[1] stream  KEYS[2] the partition's alive hash
-- ARGV[1] group  ARGV[2] at most this many entries
-- Returns {entry id, consumer, entry id, consumer, ...}
local consumers = redis.pcall('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])
if consumers.err then return {} end
local now = now_ms()
local limit = tonumber(ARGV[2])
local out = {}
for _, info in ipairs(consumers) do
  local name, pending
  for i = 1, #info, 2 do
    if info[i] == 'name' then name = info[i + 1] elseif info[i] == 'pending' then pending = info[i + 1] end
  end
  if pending > 0 and not live(KEYS[2], name, now) then
    for _, row in ipairs(redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', limit - #out / 2, name)) do
      out[#out + 1] = row[1]
      out[#out + 1] = name
    end
    if #out / 2 >= limit then return out end
  end
end
return out
