-- acm per-gateway rate limit: an exact sliding window (a log of admitted calls), what the SBT
-- algorithm of OpenSIPS ratelimit approximates with buckets. One key, its own hash tag.
--
-- KEYS[1] ZSET call_id -> worker receive time (ms) of the calls admitted within the window
-- ARGV: 1 now_ms (the worker's receive clock), 2 window_ms, 3 most calls admitted per window,
--       4 call_id
-- Returns 1 (admitted) or 0 (over the limit). A retransmission of an admitted call is admitted.
--
-- The clock is the workers' (NTP-synchronised hosts), not the call's ts: a rate is about when
-- calls arrive. Entries stamped a little later by another worker's clock count too.

if redis.call('ZSCORE', KEYS[1], ARGV[4]) then return 1 end
local now = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', string.format('%.0f', now - window))
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[1], ARGV[4])
redis.call('PEXPIRE', KEYS[1], window + 1000)
return 1
