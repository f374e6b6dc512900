-- Admit one call to one server: circuit breaker, then fleet-wide limits.
-- One script, one round trip, atomic. Redis TIME is the only clock.
--
-- It also takes the call's execution claim (delivery guarantees): a
-- redelivered call that already finished returns its stored result, one that
-- another live worker is running waits, and one whose worker died mid-call is
-- reported (or, when idempotent, taken over and run again).
--
-- KEYS[1] breaker hash   KEYS[2] in-flight zset (concurrency)   KEYS[3] rate key (GCRA)
-- KEYS[4] execution claim hash   KEYS[5] the call's cancel flag (only with a claim; optional)
-- ARGV[1] token              ARGV[2] lease ttl ms (>= the call's deadline)
-- ARGV[3] half_open_max      ARGV[4] max_concurrency (0 = none)
-- ARGV[5] rate calls (0 = none)   ARGV[6] rate period ms
-- ARGV[7] claim owner ('' = no claim)   ARGV[8] claim lease ms (heartbeat staleness)
-- ARGV[9] claim ttl ms   ARGV[10] '1' if the call is idempotent
--
-- Returns {decision, state, retry_after_ms, reason, stored_result}
--   decision: "allow" | "probe" (a half-open lease was granted) | "reject" (breaker) | "limited"
--             | "done" (stored_result holds the finished call's ToolResult JSON)
--             | "busy" (reason = the live owner) | "orphaned" (reason = the owner that died)
--             | "cancelled" (a caller flagged the call; reason = the owner that died mid-call, if any)
--
-- Order: a finished call answers with its result (cancelling it changes
-- nothing); a live duplicate waits (the running delivery is interrupted and
-- writes the one result); then the cancel flag, before the breaker and the
-- limits, so a cancelled call takes no probe, slot or rate token.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local token = ARGV[1]
local lease_ttl = tonumber(ARGV[2])
local half_open_max = tonumber(ARGV[3])
local max_concurrency = tonumber(ARGV[4])
local rate_calls = tonumber(ARGV[5])
local rate_period = tonumber(ARGV[6])

local owner, claim_lease, claim_ttl = ARGV[7], tonumber(ARGV[8]), tonumber(ARGV[9])
local takeover = false
if owner ~= '' then
  local claim = redis.call('HMGET', KEYS[4], 'state', 'owner', 'heartbeat', 'result')
  if claim[1] == 'done' then
    return {'done', 'closed', 0, claim[2] or '', claim[4] or ''}
  end
  local died = ''
  if claim[1] == 'running' and claim[2] ~= owner then
    local age = now - tonumber(claim[3] or '0')
    if age < claim_lease then
      return {'busy', 'closed', claim_lease - age, claim[2], ''}
    end
    died = claim[2]
  end
  if KEYS[5] and redis.call('EXISTS', KEYS[5]) == 1 then
    return {'cancelled', 'closed', 0, died, ''}
  end
  if died ~= '' then
    if ARGV[10] ~= '1' then
      return {'orphaned', 'closed', 0, died, ''}
    end
    takeover = true
  end
end

local state = redis.call('HGET', KEYS[1], 'state') or 'closed'
local probe = false

if state == 'open' then
  local open_until = tonumber(redis.call('HGET', KEYS[1], 'open_until') or '0')
  if now < open_until then
    return {'reject', 'open', open_until - now, 'open', ''}
  end
  state = 'half_open'
  redis.call('HSET', KEYS[1], 'state', 'half_open')
end

if state == 'half_open' then
  -- Leases are hash fields "lease:<token>" = expiry ms; an expired one
  -- frees its slot, so a worker that died mid-probe cannot wedge the breaker.
  local fields = redis.call('HGETALL', KEYS[1])
  local live, soonest = 0, nil
  for i = 1, #fields, 2 do
    if string.sub(fields[i], 1, 6) == 'lease:' then
      local expiry = tonumber(fields[i + 1])
      if expiry <= now then
        redis.call('HDEL', KEYS[1], fields[i])
      else
        live = live + 1
        if soonest == nil or expiry < soonest then soonest = expiry end
      end
    end
  end
  if live >= half_open_max then
    return {'reject', 'half_open', (soonest or now) - now, 'probe_in_flight', ''}
  end
  probe = true
end

if max_concurrency > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  if redis.call('ZCARD', KEYS[2]) >= max_concurrency then
    return {'limited', state, 0, 'concurrency', ''}
  end
end

local tat = nil
local interval = 0
if rate_calls > 0 then
  -- GCRA: a burst of up to rate_calls, then one call per interval.
  interval = rate_period / rate_calls
  tat = math.max(tonumber(redis.call('GET', KEYS[3]) or '0'), now)
  local tolerance = rate_period - interval
  if tat - now > tolerance then
    return {'limited', state, math.ceil(tat - now - tolerance), 'rate', ''}
  end
end

if max_concurrency > 0 then
  redis.call('ZADD', KEYS[2], now + lease_ttl, token)
  redis.call('PEXPIRE', KEYS[2], lease_ttl * 2)
end
if tat ~= nil then
  redis.call('SET', KEYS[3], tat + interval, 'PX', math.ceil(rate_period * 2))
end
if owner ~= '' then
  redis.call('HSET', KEYS[4], 'state', 'running', 'owner', owner, 'heartbeat', now, 'started', now)
  if takeover then redis.call('HINCRBY', KEYS[4], 'takeovers', 1) end
  redis.call('PEXPIRE', KEYS[4], claim_ttl)
end
if probe then
  redis.call('HSET', KEYS[1], 'lease:' .. token, now + lease_ttl)
  return {'probe', 'half_open', 0, 'probe', ''}
end
return {'allow', state, 0, takeover and 'takeover' or '', ''}
