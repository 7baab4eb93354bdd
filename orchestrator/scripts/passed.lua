-- Supervisor: the runs of one queue whose dispatch entry should have been delivered by now: the
-- sweep's candidates in the queued index. A run waiting in a stream needs no look while its
-- entry is ahead of the consumer group; it needs one once the group has passed the entry (it
-- was delivered, or it vanished and was skipped) or once the entry can no longer be in the
-- stream: older than the stream's first entry (trimmed), or the stream empty or gone. So a
-- sweep costs what needs a look, not the backlog waiting behind it. One more case: an entry
-- deleted ahead of the group (XDEL by hand; workers only delete delivered entries). Redis >= 7.0
-- reports the highest id ever deleted; the runs up to it are scanned once, and of those ahead
-- of the group only the ones whose entry is really gone are handed out (their score is their
-- entry id, so the entry is looked up here, without reading the run).
-- The scan pages through the index from a cursor, so one large look can span several calls.
-- KEYS[1] stream  KEYS[2] queued index
-- ARGV[1] group  ARGV[2] cursor: the score the last page ended at ('-inf' to start)
-- ARGV[3] index entries to scan at most  ARGV[4] the deleted id already looked behind ('' = none;
-- the caller keeps it so that one foreign XDEL costs one scan, not one per sweep)
-- Returns {horizon ('+inf' when the stream is empty or gone), highest deleted id ('' when Redis
-- does not say), cursor for the next page ('' when the scan reached the horizon), run id, ...}.
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

-- base: every run at or before it needs a look; scan: the runs up to it need one if their
-- entry is gone (the part beyond base comes only from a deletion ahead of the group)
local base, scan, deleted = '+inf', '+inf', ''
local stream = redis.pcall('XINFO', 'STREAM', KEYS[1])
if not stream.err then
  local info = fields(stream)
  deleted = info['max-deleted-entry-id'] or ''
  if info['length'] > 0 then
    local g = group_info(KEYS[1], ARGV[1])
    local last = g and g['last-delivered-id'] or '0-0'
    -- entries before the first one were trimmed; entries up to last-delivered were passed
    base = math.max(entry_score(info['first-entry'][1]) - 1, entry_score(last))
    scan = base
    if deleted ~= ARGV[4] and after(deleted, last) then scan = math.max(base, entry_score(deleted)) end
  end
end

local from = ARGV[2] == '-inf' and '-inf' or '(' .. ARGV[2]
local rows = redis.call('ZRANGEBYSCORE', KEYS[2], from, type(scan) == 'number' and exact(scan) or scan,
  'WITHSCORES', 'LIMIT', 0, tonumber(ARGV[3]))
local out = {type(base) == 'number' and exact(base) or base, deleted, ''}
for i = 1, #rows, 2 do
  local score = tonumber(rows[i + 1])
  local needed = base == '+inf' or score <= base
  if not needed then
    local ms = math.floor(score / SEQS)
    local seq = score - ms * SEQS
    needed = seq >= SEQS - 1 or #redis.call('XRANGE', KEYS[1], ms .. '-' .. seq, ms .. '-' .. seq) == 0
  end
  if needed then table.insert(out, rows[i]) end
end
if #rows / 2 == tonumber(ARGV[3]) then out[3] = rows[#rows] end
return out
