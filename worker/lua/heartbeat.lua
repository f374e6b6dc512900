-- Refresh the heartbeat of this worker's running claims (one round trip for all).
-- KEYS: claim hashes   ARGV[1] this process's identity (owners are "<identity>#<execution>")
-- ARGV[2] claim ttl ms
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local refreshed = 0
for i = 1, #KEYS do
  local claim = redis.call('HMGET', KEYS[i], 'state', 'owner')
  if claim[1] == 'running' and claim[2] and string.sub(claim[2], 1, #ARGV[1] + 1) == ARGV[1] .. '#' then
    redis.call('HSET', KEYS[i], 'heartbeat', now)
    redis.call('PEXPIRE', KEYS[i], tonumber(ARGV[2]))
    refreshed = refreshed + 1
  end
end
return refreshed
