# care-serve: every target creates what it needs (virtualenv, Debian packages) by itself.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Debian packages that tests and benchmarks read: real data, glyph fonts, the static checkers of the deployment
# files, and PostgreSQL (the job store's tests start a server on loopback, tests/postgres.py).
APT_PACKAGES := dataset-fashion-mnist fonts-noto-core docker-compose prometheus postgresql
# torch and torchvision first and pinned: on our machines pip takes exactly these from local disk. The virtualenv has
# the `bench` extra too (matplotlib, scikit-learn, tqdm): the tests run every benchmark on tiny settings, and
# `care-bench export` writes the README's demo data; the server itself does not need it.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: help venv apt-deps serve worker test lint typecheck check-deploy bench-model bench-registry bench-accuracy \
        bench-accuracy-glyphs100 bench-accuracy-glyphs300 bench-accuracy-one-class bench-serve bench-train \
        bench-provisional clean

help:
	@echo "make serve   start the service on its embedded defaults at http://127.0.0.1:8000"
	@echo "make test    lint, type-check and run the whole test suite"
	@echo "make bench-model | bench-registry | bench-accuracy | bench-serve | bench-train | bench-provisional   benchmarks (docs/benchmarks.md)"

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_PINS)
	$(BIN)/pip install -q -e '.[dev,bench]'
	touch $(STAMP)

venv: $(STAMP)

apt-deps:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi

serve: $(STAMP)
	$(BIN)/care-serve serve

worker: $(STAMP)
	$(BIN)/care-serve worker

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

typecheck: $(STAMP)
	$(BIN)/mypy

# The deployment files, checked statically (no Docker engine runs here): the compose stack alone and with its GPU
# override, Prometheus's configuration and its alert rules. tests/e2e/test_topology.py runs the same topology.
check-deploy: apt-deps
	docker-compose -f docker-compose.yml config -q
	docker-compose -f docker-compose.yml -f docker/compose.gpu.yml config -q
	promtool check config docker/prometheus.yml
	promtool check rules docker/alerts.yml

test: $(STAMP) apt-deps lint typecheck check-deploy
	OMP_NUM_THREADS=2 $(BIN)/pytest -q

bench-model: $(STAMP)
	$(BIN)/care-bench model

bench-registry: $(STAMP)
	$(BIN)/care-bench registry

bench-accuracy: $(STAMP) apt-deps
	$(BIN)/care-bench accuracy --stream fmnist5

bench-accuracy-glyphs100: $(STAMP) apt-deps
	$(BIN)/care-bench accuracy --stream glyphs100

bench-accuracy-glyphs300: $(STAMP) apt-deps
	$(BIN)/care-bench accuracy --stream glyphs300

# One class per task: the common case of a user adding one class per upload.
bench-accuracy-one-class: $(STAMP) apt-deps
	$(BIN)/care-bench accuracy --stream fmnist10x1
	$(BIN)/care-bench accuracy --stream glyphs20x1
	$(BIN)/care-bench accuracy --stream glyphs100x1

bench-serve: $(STAMP)
	$(BIN)/care-bench serve

bench-train: $(STAMP) apt-deps
	$(BIN)/care-bench train

# Provisional classes (issue 12): three tasks back to back and one during training, then ten back to back.
bench-provisional: $(STAMP) apt-deps
	$(BIN)/care-bench provisional --stream fmnist5 --tasks 5 --train-per-class 100 --test-per-class 50 \
	    --late --out docs/bench/provisional_fmnist5.json
	$(BIN)/care-bench provisional --stream glyphs100 --classes-per-task 2 --tasks 11 \
	    --train-per-class 100 --test-per-class 20 --out docs/bench/provisional_glyphs_10x2.json

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
