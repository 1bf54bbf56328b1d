# One entry point for set-up, tests and the main job. Everything installs into .venv from requirements.txt
# (torch pinned to the CPU wheel: torch==2.13.0). The Dockerfile runs the same pip commands.
PYTHON ?= python3.11
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed

.PHONY: install test test-integration assets data serve reproduce bench clean

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

assets: $(STAMP)
	$(BIN)/automr assets fetch

data: assets
	$(BIN)/automr data prepare --dataset ml-100k --out runs/ml-100k

clean:
	rm -rf $(VENV) .pytest_cache
