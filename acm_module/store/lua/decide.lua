-- acm decision script: one call per INVITE, one network round trip, atomic per B-number.
-- Dragonfly-correct: every key touched is in KEYS, all share the hash tag of the B-number's
-- partition ({acm.<p>}), no undeclared keys, only commands Dragonfly implements.
--
-- KEYS[1] window  ZSET  A-number -> latest call ts (ms)
-- KEYS[2] episode HASH  id, first, last, max, sev, ver of the open alert
-- KEYS[3] members SET   A-numbers of the open alert
-- KEYS[4] wlist   STRING present while the B-number is whitelisted (value: reason)
-- KEYS[5] dedup   STRING reply already given to this Call-ID
-- KEYS[6] stream  STREAM durable record of every decision and alert change (the writer's input)
-- KEYS[7] counts  HASH  alerts opened / escalated per severity in this partition (for metrics:
--                       16 small hashes to read instead of every record of the streams)
-- KEYS[8] blocks  HASH  A-number -> "expiry_ms|alert_id|severity": the block list, replicated
--                       into every partition so the check stays in this slot and this round trip
--
-- ARGV: 1 call_id, 2 a, 3 b, 4 ts_ms, 5 window_ms, 6 threshold, 7 mode (block|monitor),
--       8 gateway rule verdict: '' or '<drop|monitor>|<reason>' (rate limit, CLI origin),
--       9 alert id to use if an alert opens,
--       10 dedup_ttl_ms, 11 state_ttl_ms, 12 src_ip, 13 trunk, 14 rx_us (worker receive time),
--       15 block_ttl_ms (>0: return the window's A-numbers on detection so they can be blocked),
--       16 carrier id, 17 gateway id (attribution; '' when unknown)
-- Returns {verdict, reason, distinct, alert_id, severity, dup, block_members}

local prev = redis.call('GET', KEYS[5])
if prev then
  local v, r, n, al, sv = string.match(prev, '^([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)$')
  return {v, r, tonumber(n), al, sv, 1, {}}
end

local ts = tonumber(ARGV[4])
local window = tonumber(ARGV[5])
local verdict, reason, distinct, alert_id, sev = 'allow', 'clean', 0, '', ''
local to_block = {}

local function band(n)
  if n >= 7 then return 'CRITICAL' elseif n >= 5 then return 'HIGH' else return 'LOW' end
end

local pre_v, pre_r = string.match(ARGV[8], '^(%a+)|(.+)$')
local whitelisted = pre_v ~= 'drop' and redis.call('EXISTS', KEYS[4]) == 1
local bexp, bal, bsv
if pre_v ~= 'drop' and not whitelisted then
  local blk = redis.call('HGET', KEYS[8], ARGV[2])
  if blk then bexp, bal, bsv = string.match(blk, '^(%d+)|([^|]*)|([^|]*)$') end
end

if pre_v == 'drop' then
  -- A gateway rule refused the call: it never reaches B, so it does not enter B's window.
  verdict, reason = 'drop', pre_r
elseif whitelisted then
  reason = 'whitelisted'
elseif bexp and tonumber(bexp) > ts then
  verdict, reason, alert_id, sev = 'drop', 'blocked', bal, bsv
else
  local old = redis.call('ZSCORE', KEYS[1], ARGV[2])
  if (not old) or tonumber(old) < ts then
    redis.call('ZADD', KEYS[1], ARGV[4], ARGV[2])
  end
  -- An in-order call can never count entries older than its own window; keeping two windows
  -- tolerates calls that arrive up to one window out of order.
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. string.format('%.0f', ts - 2 * window))
  local lo = string.format('%.0f', ts - window)
  distinct = redis.call('ZCOUNT', KEYS[1], lo, '+inf')
  redis.call('PEXPIRE', KEYS[1], ARGV[11])
  if distinct >= tonumber(ARGV[6]) then
    verdict, reason = 'drop', 'masking'
    local ep = redis.call('HMGET', KEYS[2], 'id', 'first', 'last', 'max', 'ver', 'sev')
    local op, first, last, maxn, ver
    if (not ep[1]) or tonumber(ep[3]) < ts - window then
      op, alert_id, first, last, maxn, ver = 'open', ARGV[9], ts, ts, distinct, 1
      redis.call('DEL', KEYS[3])
    else
      op, alert_id = 'update', ep[1]
      first = math.min(tonumber(ep[2]), ts)
      last = math.max(tonumber(ep[3]), ts)
      maxn = math.max(tonumber(ep[4]), distinct)
      ver = tonumber(ep[5]) + 1
    end
    sev = band(maxn)
    if op == 'open' then
      redis.call('HINCRBY', KEYS[7], 'open:' .. sev, 1)
    else
      redis.call('HINCRBY', KEYS[7], 'upd', 1)
      if sev ~= ep[6] then redis.call('HINCRBY', KEYS[7], 'esc:' .. sev, 1) end
    end
    -- Counters of a partition: a fixed handful of fields, kept 30 days past the last alert.
    redis.call('PEXPIRE', KEYS[7], 2592000000)
    local members = redis.call('ZRANGEBYSCORE', KEYS[1], lo, '+inf')
    for i = 1, #members, 500 do
      redis.call('SADD', KEYS[3], unpack(members, i, math.min(i + 499, #members)))
    end
    redis.call('HSET', KEYS[2], 'id', alert_id, 'first', string.format('%.0f', first),
      'last', string.format('%.0f', last), 'max', maxn, 'sev', sev, 'ver', ver)
    redis.call('PEXPIRE', KEYS[2], ARGV[11])
    redis.call('PEXPIRE', KEYS[3], ARGV[11])
    local all = redis.call('SMEMBERS', KEYS[3])
    table.sort(all)
    redis.call('XADD', KEYS[6], '*', 'k', 'a', 'al', alert_id, 'op', op, 'b', ARGV[3],
      'sv', sev, 'n', maxn, 'an', table.concat(all, ','), 't0', string.format('%.0f', first),
      't1', string.format('%.0f', last), 'ver', ver, 'wms', ARGV[5], 'blk', ARGV[15],
      'typ', 'masking', 'cr', ARGV[16], 'gw', ARGV[17])
    if tonumber(ARGV[15]) > 0 then to_block = members end
  end
end

if pre_v == 'monitor' and reason == 'clean' then reason = pre_r end
if ARGV[7] == 'monitor' then verdict = 'allow' end
redis.call('SET', KEYS[5], verdict .. '|' .. reason .. '|' .. distinct .. '|' .. alert_id .. '|' .. sev,
  'PX', ARGV[10])
redis.call('XADD', KEYS[6], '*', 'k', 'd', 'id', ARGV[1], 'a', ARGV[2], 'b', ARGV[3],
  'ts', ARGV[4], 'v', verdict, 'r', reason, 'n', distinct, 'al', alert_id, 'sv', sev,
  'ip', ARGV[12], 'tr', ARGV[13], 'rx', ARGV[14], 'md', ARGV[7], 'cr', ARGV[16], 'gw', ARGV[17])
return {verdict, reason, distinct, alert_id, sev, 0, to_block}
