-- acm episode prelude: the sliding window, the alert episode and its severity, shared by
-- decide.lua (many A-numbers calling one B) and fanout.lua (one A calling many Bs).
-- decide/store/conn.load_script puts this text in front of both scripts, after one line setting
-- SEVERITY_HIGH and SEVERITY_CRITICAL from acm_module.core.types, so the store runs one
-- concatenated script per rule and EVALSHA names that text. Keys are passed in by the
-- caller: every key touched is still one of the script's declared KEYS (Dragonfly).

-- Record `member` at ts_ms in the window ZSET `wkey` (a member keeps its latest ts: GT leaves an
-- older call's ts alone, and spares reading the score first); return the distinct members
-- within the window and the window's lower bound (string).
local function slide(wkey, member, ts_ms, ts, window, ttl_ms)
  redis.call('ZADD', wkey, 'GT', ts_ms, member)
  -- An in-order call can never count entries older than its own window; keeping two windows
  -- tolerates calls that arrive up to one window out of order.
  redis.call('ZREMRANGEBYSCORE', wkey, '-inf', '(' .. string.format('%.0f', ts - 2 * window))
  local lo = string.format('%.0f', ts - window)
  local distinct = redis.call('ZCOUNT', wkey, lo, '+inf')
  redis.call('PEXPIRE', wkey, ttl_ms)
  return distinct, lo
end

-- Open the episode in HASH `ekey` (id new_id) or extend the open one; store its members (the
-- window's members since lo, in SET `mkey`); count the change in the partition's counters HASH
-- `ckey`, fields prefixed by `prefix`: opened per severity, updates and, when `esc`,
-- escalations per severity (a fixed handful of fields, kept 30 days past the last alert).
-- Returns a table: op ('open'|'update'), id, first, last, max, ver, sev, window_members (this
-- window's members) and all (every member of the episode, sorted, joined by commas).
-- One function rather than several: the store runs the prelude on every call, and each
-- function it defines costs a closure each time.
local function episode(ekey, mkey, wkey, ts, window, lo, distinct, new_id, ttl_ms,
                       ckey, prefix, esc)
  local ep = redis.call('HMGET', ekey, 'id', 'first', 'last', 'max', 'ver', 'sev')
  local op, id, first, last, maxn, ver, prev_sev
  if (not ep[1]) or tonumber(ep[3]) < ts - window then
    op, id, first, last, maxn, ver = 'open', new_id, ts, ts, distinct, 1
    redis.call('DEL', mkey)
  else
    op, id, prev_sev = 'update', ep[1], ep[6]
    first = math.min(tonumber(ep[2]), ts)
    last = math.max(tonumber(ep[3]), ts)
    maxn = math.max(tonumber(ep[4]), distinct)
    ver = tonumber(ep[5]) + 1
  end
  local sev = 'LOW'
  if maxn >= SEVERITY_CRITICAL then sev = 'CRITICAL'
  elseif maxn >= SEVERITY_HIGH then sev = 'HIGH' end
  if op == 'open' then
    redis.call('HINCRBY', ckey, prefix .. 'open:' .. sev, 1)
  else
    redis.call('HINCRBY', ckey, prefix .. 'upd', 1)
    if esc and sev ~= prev_sev then redis.call('HINCRBY', ckey, prefix .. 'esc:' .. sev, 1) end
  end
  redis.call('PEXPIRE', ckey, 2592000000)
  local members = redis.call('ZRANGEBYSCORE', wkey, lo, '+inf')
  for i = 1, #members, 500 do
    redis.call('SADD', mkey, unpack(members, i, math.min(i + 499, #members)))
  end
  local all
  if op == 'open' then
    -- The set was emptied above, so it holds this window's members: no need to read it back.
    all = {}
    for i = 1, #members do all[i] = members[i] end
  else
    all = redis.call('SMEMBERS', mkey)
  end
  redis.call('HSET', ekey, 'id', id, 'first', string.format('%.0f', first),
    'last', string.format('%.0f', last), 'max', maxn, 'sev', sev, 'ver', ver)
  redis.call('PEXPIRE', ekey, ttl_ms)
  redis.call('PEXPIRE', mkey, ttl_ms)
  table.sort(all)
  return {op = op, id = id, first = first, last = last, max = maxn, ver = ver, sev = sev,
          window_members = members, all = table.concat(all, ',')}
end
