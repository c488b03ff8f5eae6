# One Dockerfile, two targets:
#   docker build --target coordinator -t hilora-coordinator .   (no torch)
#   docker build --target worker -t hilora-worker .             (torch + timm)
# The worker's base image is a build argument: any image with Python >= 3.10 and pip, e.g. a
# PyTorch CUDA runtime image (its torch is kept when it satisfies torch>=2.2):
#   docker build --target worker --build-arg WORKER_BASE=pytorch/pytorch:2.4.1-cuda12.4-cudnn9-runtime .
# With the default python:3.11-slim, pip installs PyPI's torch wheel (on linux/x86_64 it bundles
# the CUDA libraries, so that image runs on GPUs too). See docs/deploy.md.
ARG PYTHON_BASE=python:3.11-slim
ARG WORKER_BASE=python:3.11-slim

FROM ${PYTHON_BASE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY coordinator ./coordinator
COPY worker ./worker
COPY hilora ./hilora
COPY migrations ./migrations

FROM base AS coordinator
# hadolint ignore=DL3013
RUN pip install ".[postgres]" && useradd --system --uid 10001 hilora && mkdir -p /data && chown 10001 /data
USER 10001
ENV HILORA_HOST=0.0.0.0 HILORA_PORT=8700 \
    HILORA_DATABASE_URL=sqlite:////data/coordinator.db HILORA_BLOB_DIR=/data/blobs
VOLUME ["/data"]
EXPOSE 8700
HEALTHCHECK --interval=10s --timeout=5s CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/v1/readyz' % os.environ['HILORA_PORT'], timeout=4)"]
# HILORA_ADMIN_TOKEN must be set at run time; the coordinator refuses to start without it.
CMD ["hilora", "coordinator"]

FROM ${WORKER_BASE} AS worker
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY --from=base /app /app
# /state: client tokens, leaves, local factors (keep it on a volume); /config: worker config files
# hadolint ignore=DL3013
RUN pip install ".[worker]" && useradd --system --uid 10001 hilora \
    && mkdir -p /state /config && chown 10001 /state /config
USER 10001
VOLUME ["/state"]
# SIGTERM: no new task, the running one gets --grace-seconds (default 30) to finish, else its lease
# is released; give `docker stop -t` / stop_grace_period about 15 s more than that.
ENTRYPOINT ["hilora", "worker", "--state-dir", "/state"]
