-- Record one call's outcome: release its concurrency slot and move the breaker.
--
-- KEYS[1] breaker hash   KEYS[2] in-flight zset   KEYS[3] execution claim hash
-- ARGV[1] token   ARGV[2] outcome: success | failure | ignore   ARGV[3] 1 if the call held a probe lease
-- ARGV[4] threshold (consecutive failures)   ARGV[5] open timeout ms
-- ARGV[6] failure rate threshold percent (0 = off)   ARGV[7] minimum calls   ARGV[8] window ms
-- ARGV[9] error code of a failure (for status)
-- ARGV[10] claim owner ('' = no claim)   ARGV[11] the ToolResult JSON   ARGV[12] claim ttl ms
-- KEYS[4] ledger zset   KEYS[5] ledger hash   ARGV[13] task id to clear from the ledger ('' = not final)
--
-- Returns {state, consecutive_failures, note}

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local token, outcome, was_probe = ARGV[1], ARGV[2], ARGV[3] == '1'
local threshold, timeout = tonumber(ARGV[4]), tonumber(ARGV[5])
local rate_threshold, minimum_calls, window = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])

redis.call('ZREM', KEYS[2], token)

-- The claim is closed with the result first, whatever the breaker does next:
-- from here on a redelivery returns this result instead of calling again.
if ARGV[10] ~= '' and redis.call('HGET', KEYS[3], 'owner') == ARGV[10] then
  redis.call('HSET', KEYS[3], 'state', 'done', 'result', ARGV[11], 'finished', now)
  redis.call('PEXPIRE', KEYS[3], tonumber(ARGV[12]))
end
if ARGV[13] ~= '' then
  redis.call('ZREM', KEYS[4], ARGV[13])
  redis.call('HDEL', KEYS[5], ARGV[13])
end

local state = redis.call('HGET', KEYS[1], 'state') or 'closed'

local function trip(failures)
  redis.call('HSET', KEYS[1], 'state', 'open', 'opened_at', now, 'open_until', now + timeout,
    'failures', failures, 'last_error', ARGV[9])
  redis.call('HINCRBY', KEYS[1], 'trips', 1)
end

if was_probe then
  local field = 'lease:' .. token
  local expiry = redis.call('HGET', KEYS[1], field)
  redis.call('HDEL', KEYS[1], field)
  -- A probe whose lease expired (or whose breaker was reset) decides nothing.
  if (not expiry) or tonumber(expiry) <= now or state ~= 'half_open' then
    return {state, tonumber(redis.call('HGET', KEYS[1], 'failures') or '0'), 'lease_lost'}
  end
  if outcome == 'success' then
    local trips = redis.call('HGET', KEYS[1], 'trips')
    redis.call('DEL', KEYS[1])
    redis.call('HSET', KEYS[1], 'state', 'closed', 'failures', 0, 'closed_at', now)
    if trips then redis.call('HSET', KEYS[1], 'trips', trips) end
    return {'closed', 0, 'probe_succeeded'}
  elseif outcome == 'failure' then
    trip(tonumber(redis.call('HGET', KEYS[1], 'failures') or '0'))
    return {'open', 0, 'probe_failed'}
  end
  return {state, 0, 'probe_ignored'}
end

-- Results of calls admitted before the breaker opened change nothing.
if state ~= 'closed' or outcome == 'ignore' then
  return {state, tonumber(redis.call('HGET', KEYS[1], 'failures') or '0'), 'ignored'}
end

local rate_tripped = false
if rate_threshold > 0 then
  -- Ten buckets over the window, reused round-robin; a bucket's stamp says
  -- which slice of time its counts belong to.
  local width = math.max(math.floor(window / 10), 1)
  local bucket = math.floor(now / width)
  local slot = bucket % 10
  if tonumber(redis.call('HGET', KEYS[1], 'ws:' .. slot) or '-1') ~= bucket then
    redis.call('HSET', KEYS[1], 'ws:' .. slot, bucket, 'wc:' .. slot, 0, 'wf:' .. slot, 0)
  end
  redis.call('HINCRBY', KEYS[1], 'wc:' .. slot, 1)
  if outcome == 'failure' then redis.call('HINCRBY', KEYS[1], 'wf:' .. slot, 1) end
  local calls, fails = 0, 0
  for s = 0, 9 do
    local stamp = tonumber(redis.call('HGET', KEYS[1], 'ws:' .. s) or '-1')
    if stamp > bucket - 10 then
      calls = calls + tonumber(redis.call('HGET', KEYS[1], 'wc:' .. s) or '0')
      fails = fails + tonumber(redis.call('HGET', KEYS[1], 'wf:' .. s) or '0')
    end
  end
  rate_tripped = calls >= minimum_calls and fails * 100 >= rate_threshold * calls
end

if outcome == 'success' then
  if redis.call('HGET', KEYS[1], 'failures') ~= '0' then
    redis.call('HSET', KEYS[1], 'state', 'closed', 'failures', 0)
  end
  if rate_tripped then trip(0); return {'open', 0, 'rate_tripped'} end
  return {'closed', 0, ''}
end

local failures = redis.call('HINCRBY', KEYS[1], 'failures', 1)
redis.call('HSET', KEYS[1], 'last_error', ARGV[9], 'last_failure_at', now)
if failures >= threshold or rate_tripped then
  trip(failures)
  return {'open', failures, 'tripped'}
end
return {'closed', failures, ''}
