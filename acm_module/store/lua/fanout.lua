-- acm fan-out signal: one A-number calling many distinct B-numbers (a SIM-box CLI at work).
-- Same episode and severity logic as decide.lua, keyed by the A-number's partition: every key
-- is declared and shares the tag {acm.<p(A)>}.
--
-- KEYS[1] window  ZSET  B-number -> latest call ts (ms)
-- KEYS[2] episode HASH  id, first, last, max, sev, ver of the open fan-out alert
-- KEYS[3] members SET   B-numbers of the open alert
-- KEYS[4] stream  STREAM the partition's durable stream
-- KEYS[5] counts  HASH  fan-out alerts opened per severity (fo:open:<SEV>), updates (fo:upd)
-- ARGV: 1 call_id, 2 a, 3 b, 4 ts_ms, 5 window_ms, 6 threshold, 7 alert id if one opens,
--       8 state_ttl_ms, 9 carrier, 10 gateway
-- Returns {distinct, alert_id, severity} ('' when no alert)

local ts = tonumber(ARGV[4])
local window = tonumber(ARGV[5])
local old = redis.call('ZSCORE', KEYS[1], ARGV[3])
if old and tonumber(old) == ts then
  -- The same call again (a retransmission): nothing changes.
  return {0, '', ''}
end
if (not old) or tonumber(old) < ts then
  redis.call('ZADD', KEYS[1], ARGV[4], ARGV[3])
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. string.format('%.0f', ts - 2 * window))
local lo = string.format('%.0f', ts - window)
local distinct = redis.call('ZCOUNT', KEYS[1], lo, '+inf')
redis.call('PEXPIRE', KEYS[1], ARGV[8])
if distinct < tonumber(ARGV[6]) then return {distinct, '', ''} end

local function band(n)
  if n >= 7 then return 'CRITICAL' elseif n >= 5 then return 'HIGH' else return 'LOW' end
end

local ep = redis.call('HMGET', KEYS[2], 'id', 'first', 'last', 'max', 'ver', 'sev')
local op, alert_id, first, last, maxn, ver
if (not ep[1]) or tonumber(ep[3]) < ts - window then
  op, alert_id, first, last, maxn, ver = 'open', ARGV[7], ts, ts, distinct, 1
  redis.call('DEL', KEYS[3])
else
  op, alert_id = 'update', ep[1]
  first = math.min(tonumber(ep[2]), ts)
  last = math.max(tonumber(ep[3]), ts)
  maxn = math.max(tonumber(ep[4]), distinct)
  ver = tonumber(ep[5]) + 1
end
local sev = band(maxn)
if op == 'open' then
  redis.call('HINCRBY', KEYS[5], 'fo:open:' .. sev, 1)
else
  redis.call('HINCRBY', KEYS[5], 'fo:upd', 1)
end
redis.call('PEXPIRE', KEYS[5], 2592000000)
local members = redis.call('ZRANGEBYSCORE', KEYS[1], lo, '+inf')
for i = 1, #members, 500 do
  redis.call('SADD', KEYS[3], unpack(members, i, math.min(i + 499, #members)))
end
redis.call('HSET', KEYS[2], 'id', alert_id, 'first', string.format('%.0f', first),
  'last', string.format('%.0f', last), 'max', maxn, 'sev', sev, 'ver', ver)
redis.call('PEXPIRE', KEYS[2], ARGV[8])
redis.call('PEXPIRE', KEYS[3], ARGV[8])
local all = redis.call('SMEMBERS', KEYS[3])
table.sort(all)
redis.call('XADD', KEYS[4], '*', 'k', 'a', 'al', alert_id, 'op', op, 'typ', 'fanout',
  'a', ARGV[2], 'b', '', 'sv', sev, 'n', maxn, 'an', table.concat(all, ','),
  't0', string.format('%.0f', first), 't1', string.format('%.0f', last), 'ver', ver,
  'wms', ARGV[5], 'blk', '0', 'cr', ARGV[9], 'gw', ARGV[10])
return {distinct, alert_id, sev}
