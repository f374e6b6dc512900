-- Rebuild the fleet's tool map from every server's published tool list, then bump its version.
-- KEYS: map, version, then each server's tools key; ARGV: the server names, in KEYS' order.
local map_key, version_key = KEYS[1], KEYS[2]
local by_tool = {}
local order = {}
for i = 3, #KEYS do
  local raw = redis.call('GET', KEYS[i])
  if raw then
    local ok, doc = pcall(cjson.decode, raw)
    if ok and type(doc) == 'table' and type(doc['tools']) == 'table' then
      for _, tool in ipairs(doc['tools']) do
        local name = tool['name']
        if type(name) == 'string' then
          if not by_tool[name] then by_tool[name] = {}; table.insert(order, name) end
          table.insert(by_tool[name], ARGV[i - 2])
        end
      end
    end
  end
end
redis.call('DEL', map_key)
for _, name in ipairs(order) do
  redis.call('HSET', map_key, name, cjson.encode(by_tool[name]))
end
return redis.call('INCR', version_key)
