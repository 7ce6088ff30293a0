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

.PHONY: demo test ui lint bench bench-setup clean browser services services-stop test-cluster server-packages

$(STAMP): pyproject.toml setup.cfg
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade --quiet pip
	$(BIN)/python -m pip install --quiet -e '.[dev,cluster]'
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/curate demo

# The review page is tested in a real headless Chromium (Debian's package, driven by playwright;
# no browser download). Installed here when missing and apt-get can run; otherwise the page
# tests skip and say so, unless CURATION_REQUIRE_BROWSER=1 (set by .ci/run) makes that an error.
browser:
	@command -v chromium >/dev/null || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] \
		&& (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
		|| echo "chromium not installed: the review-page browser tests will skip"; }

test: $(STAMP) browser server-packages
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -n 2 --dist loadgroup

# The servers of the cluster test and of `make services`: PostgreSQL and Redis from the system
# packages, installed when missing and apt-get can run (as in CI); otherwise the cluster test
# skips and says so, unless CURATION_REQUIRE_CLUSTER=1 (set by .ci/run) makes that an error.
server-packages:
	@{ command -v pg_ctl >/dev/null || ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1; } \
		&& command -v redis-server >/dev/null || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] \
		&& { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql redis-server >/dev/null 2>&1 \
		|| { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql redis-server >/dev/null; }; } \
		|| echo "postgresql / redis-server not installed: the cluster test will skip"; }

# A real multi-process cluster on this machine: Postgres, Redis, an S3 endpoint and two celery
# workers, the demo materialized on them and compared with a local run (every service stopped).
test-cluster: $(STAMP) server-packages
	$(BIN)/python -m pytest -n 1 curation_assets_tests/test_cluster.py

# A Postgres (instance storage) and a Redis (celery broker) for development, kept running under
# $(CURATION_HOME)/services; again: nothing to do. Prints where they listen.
services: $(STAMP) server-packages
	$(BIN)/python -m curation_assets.services start
	$(BIN)/python -m curation_assets.services status

services-stop: $(STAMP)
	$(BIN)/python -m curation_assets.services stop

ui: $(STAMP)
	$(BIN)/curate init-instance
	$(BIN)/dagster dev -w workspace.yaml

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The peer the benchmarks run side by side (--vs-vdc): the `bench` extra, installed with the
# torch and torchvision already in the environment pinned by a constraint file, so that VDC's
# requirements (birder, pt_kmeans) never swap our torch build for another one.
bench-setup: $(STAMP)
	$(BIN)/python -m pip freeze | grep -iE '^(torch|torchvision)==' > $(VENV)/bench-constraints.txt
	$(BIN)/python -m pip install --quiet -c $(VENV)/bench-constraints.txt -e '.[dev,bench]'

bench: $(STAMP)
	$(BIN)/python benchmarks/sanitize.py
	$(BIN)/python benchmarks/embed.py
	$(BIN)/python benchmarks/dedup.py --sizes 200000 1000000 --vs-vdc
	$(BIN)/python benchmarks/kmeans.py --vs-vdc
	$(BIN)/python benchmarks/orchestration.py

clean:
	rm -rf $(CURATION_HOME)
