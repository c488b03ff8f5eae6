# One Dockerfile, two targets:
#   docker build --target coordinator -t hilora-coordinator .   (no torch)
#   docker build --target worker -t hilora-worker .             (torch + timm)
# The worker's base image is a build argument: any image with Python >= 3.10 and pip, e.g. a
# PyTorch CUDA runtime image, whose torch is kept with TORCH_FROM_BASE=1 (below):
#   docker build --target worker --build-arg WORKER_BASE=pytorch/pytorch:2.4.1-cuda12.4-cudnn9-runtime \
#     --build-arg TORCH_FROM_BASE=1 .
# With the default python:3.11-slim, pip installs PyPI's torch wheel (on linux/x86_64 it bundles
# the CUDA libraries, so that image runs on GPUs too). See docs/deploy.md.
# Every pip install is constrained by constraints.txt (pip-compile; docs/usage.md): the versions CI
# tested. TORCH_FROM_BASE=1 keeps the torch of a WORKER_BASE that has one (a PyTorch image): the
# torch family's pins (torch, torchvision, triton, nvidia-*, cuda-*) are dropped and torch, and
# torchvision and triton where the base has them, are held at the base's versions.
# Any base works whose python and pip are first on PATH and that lets pip install (Debian's own
# python3 refuses: put a venv first on PATH, as tests/integration/test_containers.py does).
ARG PYTHON_BASE=python:3.11-slim
ARG WORKER_BASE=python:3.11-slim

FROM ${PYTHON_BASE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md constraints.txt ./
COPY shared ./shared
COPY coordinator ./coordinator
COPY worker ./worker
COPY hilora ./hilora
COPY migrations ./migrations

FROM base AS coordinator
# hadolint ignore=DL3013
RUN pip install -c constraints.txt ".[postgres]" && useradd --system --uid 10001 hilora && mkdir -p /data && chown 10001 /data
USER 10001
ENV HILORA_HOST=0.0.0.0 HILORA_PORT=8700 \
    HILORA_DATABASE_URL=sqlite:////data/coordinator.db HILORA_BLOB_DIR=/data/blobs
VOLUME ["/data"]
EXPOSE 8700
HEALTHCHECK --interval=10s --timeout=5s CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/v1/readyz' % os.environ['HILORA_PORT'], timeout=4)"]
# HILORA_ADMIN_TOKEN must be set at run time; the coordinator refuses to start without it.
CMD ["hilora", "coordinator"]

FROM ${WORKER_BASE} AS worker
ARG TORCH_FROM_BASE=0
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY --from=base /app /app
SHELL ["/bin/sh", "-eu", "-c"]
# /state: client tokens, leaves, local factors (keep it on a volume); /config: worker config files
# hadolint ignore=DL3013
RUN if [ "$TORCH_FROM_BASE" = 1 ]; then \
        python -c "import torch" || { echo "TORCH_FROM_BASE=1: WORKER_BASE has no torch" >&2; exit 1; }; \
        grep -vE '^(torch|torchvision|triton|nvidia-[a-z0-9-]+|cuda-[a-z0-9-]+)==' constraints.txt > /tmp/constraints.txt; \
        python -c "import importlib.metadata as m; print('\n'.join(sorted({d.metadata['Name'].lower() + '==' + d.version for d in m.distributions() if d.metadata['Name'].lower() in ('torch', 'torchvision', 'triton')})))" >> /tmp/constraints.txt; \
    else cp constraints.txt /tmp/constraints.txt; fi \
    && pip install -c /tmp/constraints.txt ".[worker]" && rm /tmp/constraints.txt \
    && useradd --system --uid 10001 hilora && mkdir -p /state /config && chown 10001 /state /config
USER 10001
VOLUME ["/state"]
# SIGTERM: no new task, the running one gets --grace-seconds (default 30) to finish, else its lease
# is released; give `docker stop -t` / stop_grace_period about 15 s more than that.
ENTRYPOINT ["hilora", "worker", "--state-dir", "/state"]
