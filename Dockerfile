# automr: the online service on the CPU.
#   docker build -t automr .                         (assets fetched at run time into the volume)
#   docker build --build-arg BAKE_ASSETS=1 -t automr .   (assets baked into the image)
# The install runs the Makefile's own `make install` (the same pip commands as CI); torch comes from
# PyTorch's CPU index (requirements.txt pins torch==2.13.0, the CPU wheel).
FROM python:3.11-slim-bookworm

ARG BAKE_ASSETS=0
# the commit, for GET /version (docker build --build-arg GIT_SHA=$(git rev-parse HEAD) ...)
ARG GIT_SHA=unknown
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_INDEX_URL=https://download.pytorch.org/whl/cpu \
    PIP_EXTRA_INDEX_URL=https://pypi.org/simple \
    AUTOMR_HOME=/data \
    AUTOMR_DATA_DIR=/data/runs/ml-100k \
    AUTOMR_GIT_SHA=$GIT_SHA \
    AUTOMR_HOST=0.0.0.0 \
    AUTOMR_PORT=8000

# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends make curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 10001 automr \
    && mkdir -p /data && chown automr:automr /data

WORKDIR /app
COPY --chown=automr:automr requirements.txt pyproject.toml Makefile README.md ./
COPY --chown=automr:automr model ./model
COPY --chown=automr:automr memory_store ./memory_store
COPY --chown=automr:automr service ./service
USER 10001
RUN make install PYTHON=python3.11 \
    && if [ "$BAKE_ASSETS" = "1" ]; then .venv/bin/automr assets fetch; fi

VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=1800s --retries=3 \
    CMD ["sh", "-c", "curl -fsS http://127.0.0.1:${AUTOMR_PORT}/healthz || exit 1"]

# First start: fetch assets, prepare ML-100K and train the quick-start artefacts into the volume (the
# Makefile's `artefacts` target, idempotent; artefacts of `automr reproduce` in the volume win), then
# serve with the server as PID 1 (SIGTERM -> graceful shutdown).
CMD ["sh", "-c", "make artefacts RUNS=/data/runs && AUTOMR_ARTEFACTS_DIR=\"$(make -s print-artefacts RUNS=/data/runs)\" exec .venv/bin/automr serve"]
