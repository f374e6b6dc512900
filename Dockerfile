# mcpq: one image for the worker, Flower, the HTTP API and the demo MCP server
# (docker-compose.yml picks the command). Build: docker build -t mcpq .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# The package with the extras the services need: api (mcpq api), flower (celery -A mcpq.worker flower),
# gateway (mcpq gateway).
# The repository's root holds mcpq/__init__.py; worker/, producer/ and gateway/ install as mcpq.worker, mcpq.producer, mcpq.gateway.
COPY pyproject.toml README.md __init__.py py.typed ./
COPY worker ./worker
COPY producer ./producer
COPY gateway ./gateway
RUN pip install ".[api,flower,gateway]"

# Server configs; MCPQ_CONFIG picks one (compose: config/docker.yaml).
COPY config ./config

# Run as an unprivileged user; /app/state is where Flower's --persistent db lives.
RUN useradd --create-home --uid 10001 --user-group mcpq \
    && mkdir -p /app/state \
    && chown mcpq:mcpq /app/state
USER mcpq

ENV MCPQ_CONFIG=config/docker.yaml
CMD ["mcpq", "worker"]
