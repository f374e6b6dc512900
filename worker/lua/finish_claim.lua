-- Close a claim with a result without touching a breaker (e.g. outcome_unknown).
-- KEYS[1] claim hash   ARGV[1] result JSON   ARGV[2] ttl ms   ARGV[3] owner to record
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if redis.call('HGET', KEYS[1], 'state') == 'done' then
  return redis.call('HGET', KEYS[1], 'result')
end
redis.call('HSET', KEYS[1], 'state', 'done', 'result', ARGV[1], 'finished', now, 'closed_by', ARGV[3])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]))
return ARGV[1]
