-- Record enqueued calls in the ledger before they are published, so that a
-- message the broker loses is found and published again.
-- KEYS[1] ledger zset (task id -> due ms)   KEYS[2] ledger hash (task id -> message JSON)
-- KEYS[3] members hash (id of a call inside a chunk -> the chunk's task id)
-- ARGV[1] grace ms   ARGV[2] n, then n pairs: task id, message JSON,
-- then pairs: call id, chunk task id
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local due = now + tonumber(ARGV[1])
local n = tonumber(ARGV[2])
local last = 2 + 2 * n
for i = 3, last, 2 do
  redis.call('ZADD', KEYS[1], due, ARGV[i])
  redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
end
for i = last + 1, #ARGV, 2 do
  redis.call('HSET', KEYS[3], ARGV[i], ARGV[i + 1])
end
return n
