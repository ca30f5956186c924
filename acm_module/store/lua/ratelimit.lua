-- acm per-gateway rate limit: an exact sliding window (a log of admitted calls), what the SBT
-- algorithm of OpenSIPS ratelimit approximates with buckets. One key, its own hash tag.
--
-- KEYS[1] ZSET call_id -> call ts (ms) of the calls admitted within the last two windows
-- ARGV: 1 ts_ms, 2 window_ms, 3 most calls admitted per window, 4 call_id
-- Returns 1 (admitted) or 0 (over the limit). A retransmission of an admitted call is admitted.

if redis.call('ZSCORE', KEYS[1], ARGV[4]) then return 1 end
local ts = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
-- Two windows are kept so calls arriving up to one window out of order still count right.
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. string.format('%.0f', ts - 2 * window))
local n = redis.call('ZCOUNT', KEYS[1], '(' .. string.format('%.0f', ts - window),
  string.format('%.0f', ts))
if n >= tonumber(ARGV[3]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[1], ARGV[4])
redis.call('PEXPIRE', KEYS[1], 2 * window + 1000)
return 1
