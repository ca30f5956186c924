-- acm fan-out signal: one A-number calling many distinct B-numbers (a SIM-box CLI at work).
-- The episode and severity logic of decide.lua (episode.lua, which the loader puts first),
-- keyed by the A-number's partition: every key is declared and shares the tag {acm.<p(A)>}.
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
local distinct, lo = slide(KEYS[1], ARGV[3], ARGV[4], ts, window, ARGV[8])
if distinct < tonumber(ARGV[6]) then return {distinct, '', ''} end

local e = episode(KEYS[2], KEYS[3], KEYS[1], ts, window, lo, distinct, ARGV[7], ARGV[8],
                  KEYS[5], 'fo:', false)
redis.call('XADD', KEYS[4], '*', 'k', 'a', 'al', e.id, 'op', e.op, 'typ', 'fanout',
  'a', ARGV[2], 'b', '', 'sv', e.sev, 'n', e.max, 'an', e.all,
  't0', string.format('%.0f', e.first), 't1', string.format('%.0f', e.last), 'ver', e.ver,
  'wms', ARGV[5], 'blk', '0', 'cr', ARGV[9], 'gw', ARGV[10])
return {distinct, e.id, e.sev}
