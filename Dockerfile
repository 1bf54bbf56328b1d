# automr: the online service on the CPU.
#   docker build -t automr .                             (assets fetched at run time into the volume)
#   docker build --build-arg BAKE_ASSETS=1 -t automr .   (assets baked into the image)
# Behind a mirror: --build-arg PIP_INDEX_URL=... PIP_EXTRA_INDEX_URL=... FIND_LINKS=... CA_BUNDLE=...
# (bench/docker_build_run.sh builds and runs it with buildah on a machine without a Docker engine).
# The build stage runs the Makefile's `make install-runtime` (the runtime pins of requirements-runtime.txt:
# torch==2.13.0, the CPU wheel, from PyTorch's CPU index); the final image holds that venv and the code,
# with no compilers, test or plotting tools, or pip caches.
FROM python:3.11-slim-bookworm AS build

ARG PIP_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG PIP_EXTRA_INDEX_URL=https://pypi.org/simple
# a folder of wheels (mounted into the build) and a CA bundle for the index, both optional
ARG FIND_LINKS=""
ARG CA_BUNDLE=""
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends make \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY requirements-runtime.txt requirements.txt pyproject.toml Makefile README.md ./
COPY model ./model
COPY memory_store ./memory_store
COPY service ./service
# an empty PIP_CERT would switch TLS verification off, so the optional ones are set only when given
RUN if [ -n "$CA_BUNDLE" ]; then export PIP_CERT="$CA_BUNDLE"; fi \
    && if [ -n "$FIND_LINKS" ]; then export PIP_FIND_LINKS="$FIND_LINKS"; fi \
    && make install-runtime PYTHON=python3.11 \
    && find .venv -name __pycache__ -prune -exec rm -rf {} +

FROM python:3.11-slim-bookworm

ARG BAKE_ASSETS=0
# the commit, for GET /version (docker build --build-arg GIT_SHA=$(git rev-parse HEAD) ...)
ARG GIT_SHA=unknown
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    AUTOMR_HOME=/data \
    AUTOMR_DATA_DIR=/data/runs/ml-100k \
    AUTOMR_GIT_SHA=$GIT_SHA \
    AUTOMR_HOST=0.0.0.0 \
    AUTOMR_PORT=8000

# libjemalloc2: `automr serve` preloads it (AUTOMR_MALLOC=auto, service/serve_env.py): with glibc's
# malloc the server's RSS grows under load (docs/BENCHMARKS.md §5, §7.2). /app belongs to the service's
# user, which writes nothing there but must own what it runs.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends make curl libjemalloc2 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 10001 automr \
    && mkdir -p /data /app && chown automr:automr /data /app

WORKDIR /app
COPY --from=build --chown=automr:automr /app /app
USER 10001
RUN if [ "$BAKE_ASSETS" = "1" ]; then .venv/bin/automr assets fetch; fi

VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=1800s --retries=3 \
    CMD ["sh", "-c", "curl -fsS http://127.0.0.1:${AUTOMR_PORT}/healthz || exit 1"]

# First start: fetch assets, prepare ML-100K and train the quick-start artefacts into the volume (the
# Makefile's `artefacts` target, idempotent; artefacts of `automr reproduce` in the volume win), then
# serve with the server as PID 1 (SIGTERM -> graceful shutdown). `automr serve` sizes torch's threads
# from the container's CPU quota and affinity (service/cpu_budget.py).
CMD ["sh", "-c", "make artefacts RUNS=/data/runs && AUTOMR_ARTEFACTS_DIR=\"$(make -s print-artefacts RUNS=/data/runs)\" exec .venv/bin/automr serve"]
