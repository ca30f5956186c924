-- acm decision script: one call per INVITE, one network round trip, atomic per B-number.
-- Runs after episode.lua (slide, episode), which the loader puts first.
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
  local lo
  distinct, lo = slide(KEYS[1], ARGV[2], ARGV[4], ts, window, ARGV[11])
  if distinct >= tonumber(ARGV[6]) then
    verdict, reason = 'drop', 'masking'
    local e = episode(KEYS[2], KEYS[3], KEYS[1], ts, window, lo, distinct, ARGV[9], ARGV[11],
                      KEYS[7], '', true)
    alert_id, sev = e.id, e.sev
    redis.call('XADD', KEYS[6], '*', 'k', 'a', 'al', alert_id, 'op', e.op, 'b', ARGV[3],
      'sv', sev, 'n', e.max, 'an', e.all, 't0', string.format('%.0f', e.first),
      't1', string.format('%.0f', e.last), 'ver', e.ver, 'wms', ARGV[5], 'blk', ARGV[15],
      'typ', 'masking', 'cr', ARGV[16], 'gw', ARGV[17])
    if tonumber(ARGV[15]) > 0 then to_block = e.window_members end
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
