-- Supervisor: the runs of one queue whose dispatch entry should have been delivered by now: the
-- sweep's candidates in the queued index. A run waiting in a stream needs no look while its
-- entry is ahead of the consumer group; it needs one once the group has passed the entry (it
-- was delivered, or it vanished and was skipped) or once the entry can no longer be in the
-- stream: older than the stream's first entry (trimmed), the stream empty or gone, or at or
-- before an entry someone deleted ahead of the group (XDEL; only workers' acks delete entries,
-- and those were delivered: Redis >= 7.0 reports the highest id ever deleted). So a sweep costs
-- what needs a look, not the backlog waiting behind it.
-- KEYS[1] stream  KEYS[2] queued index
-- ARGV[1] group  ARGV[2] offset  ARGV[3] max count  ARGV[4] the deleted id already looked behind
-- ('' = none; the caller keeps it so one foreign XDEL costs one look at the runs before it)
-- Returns {horizon (an entry score, see entry_score; '+inf' when the stream is empty or gone), highest deleted id ('' when
-- Redis does not say), run id, ...}: the queued runs whose entry is at or before the
-- horizon, oldest first.
local function id_parts(id)
  local ms, seq = string.match(id or '', '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq)
end
local function after(a, b)
  local ams, aseq = id_parts(a)
  local bms, bseq = id_parts(b)
  if not ams or not bms then return false end
  return ams > bms or (ams == bms and aseq > bseq)
end
local function fields(flat)
  local out = {}
  for i = 1, #flat, 2 do out[flat[i]] = flat[i + 1] end
  return out
end

local horizon, deleted = '+inf', ''
local stream = redis.pcall('XINFO', 'STREAM', KEYS[1])
if not stream.err then
  local info = fields(stream)
  deleted = info['max-deleted-entry-id'] or ''
  if info['length'] > 0 then
    horizon = entry_score(info['first-entry'][1]) - 1 / 2048  -- entries before the first one: trimmed
    local last = '0-0'
    local groups = redis.pcall('XINFO', 'GROUPS', KEYS[1])
    if not groups.err then
      for _, group in ipairs(groups) do
        local g = fields(group)
        if g['name'] == ARGV[1] then last = g['last-delivered-id'] end
      end
    end
    horizon = math.max(horizon, entry_score(last))
    if deleted ~= ARGV[4] and after(deleted, last) then horizon = math.max(horizon, entry_score(deleted)) end
  end
end
if type(horizon) == 'number' then horizon = exact(horizon) end
local out = {horizon, deleted}
for _, run_id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', horizon, 'LIMIT', tonumber(ARGV[2]),
    tonumber(ARGV[3]))) do
  table.insert(out, run_id)
end
return out
