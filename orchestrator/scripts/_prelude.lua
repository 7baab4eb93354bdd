-- Shared helpers, prepended to every script when it is loaded (scripts.py).
-- Times are the Redis server's clock, never a worker's.

local TERMINAL = {completed = true, failed = true, cancelled = true}

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- A history event: the JSON object `body` (built and escaped by Python, at least one field)
-- with "type" and the server time "at" put in front.
local function stamp(kind, body, now)
  return '{"type":"' .. kind .. '","at":' .. string.format('%d', now) .. ',' .. string.sub(body, 2)
end

-- Add to a fleet-wide counter in the stats hash, in the same atomic step as what it counts.
local function count(stats_key, name, amount)
  redis.call('HINCRBY', stats_key, name, amount or 1)
end

-- Add to a per-workflow / per-step counter (fields joined with '|'), for metrics.
local function detail(detail_key, amount, ...)
  redis.call('HINCRBY', detail_key, table.concat({...}, '|'), amount)
end

-- A history event built here from a Lua table (cjson escapes the strings).
local function event(fields)
  return cjson.encode(fields)
end
