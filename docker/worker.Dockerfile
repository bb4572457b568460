# The GPU worker image: `maskd[worker]` (the Celery worker, torch and torchvision with CUDA,
# MLflow, pycocotools). PyPI's default torch wheels for x86_64 are CUDA builds that bring their
# own CUDA runtime as pip packages, so the base is plain Python: the host needs only the NVIDIA
# driver (new enough for that CUDA; see docs/deploy.md) and the NVIDIA Container Toolkit.
#
# Installed from the wheel: the first stage builds it from the source tree, the runtime stage
# installs only that wheel and its dependencies. No source file is copied into the runtime image.
#
#   docker build -f docker/worker.Dockerfile -t maskd-worker .
#
# Build arguments: PYTHON_IMAGE (pinned base), TORCH_VERSION / TORCHVISION_VERSION (must match
# pyproject.toml; tests/test_deployment.py checks it), and TORCH_INDEX_URL + TORCH_SUFFIX for
# another CUDA build, e.g. https://download.pytorch.org/whl/cu126 and +cu126 for older drivers.

ARG PYTHON_IMAGE=python:3.11.16-slim-bookworm

FROM ${PYTHON_IMAGE} AS wheel
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# The context is filtered by docker/worker.Dockerfile.dockerignore.
COPY . .
RUN python -m pip wheel --no-deps --wheel-dir /wheels . \
    && ls /wheels/maskd-*.whl

FROM ${PYTHON_IMAGE} AS runtime
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
ARG TORCH_INDEX_URL=
ARG TORCH_SUFFIX=

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MLFLOW_DISABLE_TELEMETRY=true \
    DO_NOT_TRACK=true \
    MASKD_DATA_DIR=/var/lib/maskd \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

COPY docker/healthcheck.py /usr/local/bin/maskd-healthcheck

# uid/gid 1000, fixed: the job directory is shared with the API and, over NFS, with other hosts,
# so every container writes checkpoints as the same owner.
RUN chmod 0755 /usr/local/bin/maskd-healthcheck \
    && groupadd --gid 1000 maskd \
    && useradd --uid 1000 --gid 1000 --create-home --shell /usr/sbin/nologin maskd \
    && install -d -o maskd -g maskd /var/lib/maskd

# torch and torchvision first, pinned, in their own layer: a few GB that code changes must not
# download again.
RUN python -m pip install ${TORCH_INDEX_URL:+--extra-index-url "${TORCH_INDEX_URL}"} \
        "torch==${TORCH_VERSION}${TORCH_SUFFIX}" \
        "torchvision==${TORCHVISION_VERSION}${TORCH_SUFFIX}"

COPY --from=wheel /wheels/ /tmp/wheels/
RUN set -eu; \
    wheel="$(ls /tmp/wheels/maskd-*.whl)"; \
    python -m pip install "${wheel}[worker]"; \
    rm -rf /tmp/wheels; \
    python -m pip check; \
    python -c "import sys, torch, torchvision, pycocotools; \
v = torch.__version__.split('+')[0]; \
sys.exit(0 if v == '${TORCH_VERSION}' and torch.version.cuda is not None \
else f'expected a CUDA build of torch ${TORCH_VERSION}, got {torch.__version__}')"; \
    maskd --help > /dev/null

USER 1000:1000
WORKDIR /home/maskd
# Until the worker writes a heartbeat file (docs/deploy.md, "Worker liveness"), the image checks
# that the worker can reach its broker and database; docker-compose.yml may override this.
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
    CMD ["maskd-healthcheck", "reach", "MASKD_BROKER_URL", "MASKD_DATABASE_URL"]
CMD ["maskd", "worker", "--queues", "gpu", "--concurrency", "1"]
