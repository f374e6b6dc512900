-- Record enqueued calls in the ledger before they are published, so that a
-- message the broker loses is found and published again.
-- KEYS[1] ledger zset (task id -> due ms)   KEYS[2] ledger hash (task id -> message JSON)
-- ARGV[1] grace ms, then pairs: task id, message JSON
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local due = now + tonumber(ARGV[1])
for i = 2, #ARGV, 2 do
  redis.call('ZADD', KEYS[1], due, ARGV[i])
  redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
end
return (#ARGV - 1) / 2
