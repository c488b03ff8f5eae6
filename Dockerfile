# One Dockerfile, two targets:
#   docker build --target coordinator -t hilora-coordinator .   (no torch)
#   docker build --target worker -t hilora-worker .             (torch + timm)
FROM python:3.11-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY coordinator ./coordinator
COPY worker ./worker
COPY hilora ./hilora
COPY migrations ./migrations

FROM base AS coordinator
RUN pip install ".[postgres]" && useradd --system --uid 10001 hilora && mkdir -p /data && chown hilora /data
USER hilora
ENV HILORA_HOST=0.0.0.0 HILORA_PORT=8700 \
    HILORA_DATABASE_URL=sqlite:////data/coordinator.db HILORA_BLOB_DIR=/data/blobs
VOLUME ["/data"]
EXPOSE 8700
HEALTHCHECK --interval=10s --timeout=3s CMD python -c "import urllib.request,os;urllib.request.urlopen(f'http://127.0.0.1:{os.environ[\"HILORA_PORT\"]}/v1/readyz')"
# HILORA_ADMIN_TOKEN must be set at run time; the coordinator refuses to start without it.
CMD ["hilora", "coordinator"]

FROM base AS worker
RUN pip install ".[worker]" && useradd --system --uid 10001 hilora && mkdir -p /state && chown hilora /state
USER hilora
VOLUME ["/state"]
ENTRYPOINT ["hilora", "worker", "--state-dir", "/state"]
