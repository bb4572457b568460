# The API image: `maskd[service]` on CPU-only PyTorch (the API validates every spec with a dry
# run of both models on one sample, so it needs torch, but never a GPU). docker-compose.yml also
# runs the migration job (`maskd db upgrade`), the reconciler (`maskd reconcile`), the MLflow
# tracking server (`maskd mlflow`) and Flower from this image.
#
# Installed from the wheel: the first stage builds it from the source tree, the runtime stage
# installs only that wheel and its dependencies, exactly what `pip install maskd[service]`
# gives a user. No source file is copied into the runtime image.
#
#   docker build -f docker/api.Dockerfile -t maskd-api .
#
# Build arguments: PYTHON_IMAGE (pinned base), TORCH_VERSION / TORCHVISION_VERSION (must match
# pyproject.toml; tests/test_deployment.py checks it), TORCH_INDEX_URL + TORCH_SUFFIX (where the
# CPU wheels come from, and their local version label), EXTRA_PIP_PACKAGES (more packages for a
# derived role, e.g. Flower).

ARG PYTHON_IMAGE=python:3.11.16-slim-bookworm

FROM ${PYTHON_IMAGE} AS wheel
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# The context is filtered by docker/api.Dockerfile.dockerignore.
COPY . .
RUN python -m pip wheel --no-deps --wheel-dir /wheels . \
    && ls /wheels/maskd-*.whl

FROM ${PYTHON_IMAGE} AS runtime
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_SUFFIX=+cpu
ARG EXTRA_PIP_PACKAGES=

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MLFLOW_DISABLE_TELEMETRY=true \
    DO_NOT_TRACK=true \
    MASKD_DATA_DIR=/var/lib/maskd

COPY docker/healthcheck.py /usr/local/bin/maskd-healthcheck

# uid/gid 1000, fixed, so files on a shared job directory (NFS) have one owner on every host.
# The folders exist in the image, owned by maskd, so new named volumes mounted there start
# writable by the non-root user.
RUN chmod 0755 /usr/local/bin/maskd-healthcheck \
    && groupadd --gid 1000 maskd \
    && useradd --uid 1000 --gid 1000 --create-home --shell /usr/sbin/nologin maskd \
    && install -d -o maskd -g maskd /var/lib/maskd /var/lib/mlflow /var/lib/mlflow/artifacts

# The CPU build of torch first, in its own layer (cached across code changes). The `+cpu` pin
# can only come from the CPU index, and `maskd[service]`'s `torch==X` accepts it, so the wheel's
# install below keeps it rather than pulling the CUDA build from PyPI.
RUN python -m pip install --extra-index-url "${TORCH_INDEX_URL}" \
        "torch==${TORCH_VERSION}${TORCH_SUFFIX}" \
        "torchvision==${TORCHVISION_VERSION}${TORCH_SUFFIX}"

COPY --from=wheel /wheels/ /tmp/wheels/
RUN set -eu; \
    wheel="$(ls /tmp/wheels/maskd-*.whl)"; \
    python -m pip install "${wheel}[service]" ${EXTRA_PIP_PACKAGES}; \
    rm -rf /tmp/wheels; \
    python -m pip check; \
    python -c "import sys, torch, torchvision; \
v = torch.__version__.split('+')[0]; \
sys.exit(0 if v == '${TORCH_VERSION}' and torch.version.cuda is None \
else f'expected the CPU build of torch ${TORCH_VERSION}, got {torch.__version__}')"; \
    maskd --help > /dev/null

USER 1000:1000
WORKDIR /home/maskd
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["maskd-healthcheck", "http", "http://127.0.0.1:8000/healthz"]
CMD ["maskd", "serve", "--host", "0.0.0.0", "--port", "8000"]
