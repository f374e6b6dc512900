"""Task names: the producer sends by name, so these strings are the contract."""

CALL_TOOL = "mcpq.call_tool"
#: Several calls in one message (fan-out); each call keeps its own id and result.
CALL_CHUNK = "mcpq.call_chunk"
#: Most calls one chunk message may hold: a chunk's run time grows with its
#: size, and it must stay well inside the broker's visibility timeout.
MAX_CHUNK_CALLS = 1000
DISCOVER = "mcpq.discover"
HEALTH = "mcpq.health"
RECONNECT = "mcpq.reconnect"

#: Queue every mcpq task goes to unless routed otherwise.
DEFAULT_QUEUE = "mcpq"
