# One command each: `make demo` (set up + run the main job on the demo), `make test`,
# `make ui` (the Dagster UI on the runs the demo made). `.venv` is created when missing.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

export CURATION_HOME ?= $(CURDIR)/.curation
export DAGSTER_HOME ?= $(CURATION_HOME)/dagster_home
export HF_HUB_OFFLINE ?= 1

.PHONY: demo test ui lint bench clean

$(STAMP): pyproject.toml setup.cfg
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade --quiet pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/curate demo

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -n 2 --dist loadgroup

ui: $(STAMP)
	$(BIN)/curate init-instance
	$(BIN)/dagster dev -w workspace.yaml

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: $(STAMP)
	$(BIN)/python benchmarks/sanitize.py
	$(BIN)/python benchmarks/embed.py
	$(BIN)/python benchmarks/dedup.py --sizes 200000 1000000

clean:
	rm -rf $(CURATION_HOME)
