# dpop-signer: the two commands a fresh machine needs are `make demo` and `make test`.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
INTEROP := tests/interop
NODE_STAMP := $(INTEROP)/node_modules/.installed
SOFTHSM_DIR := .softhsm
BENCH_ARGS ?=
export SOFTHSM2_CONF ?= $(CURDIR)/$(SOFTHSM_DIR)/softhsm2.conf
PYTEST_ARGS ?=

.PHONY: help install system-deps node-deps softhsm demo test lint fmt bench clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -U pip
	$(BIN)/pip install -q --disable-pip-version-check -e '.[dev,bench]'
	@touch $(STAMP)

install: $(STAMP)  ## virtualenv in .venv with the package and its dev extras

system-deps:  ## SoftHSM2 and p11-kit-modules from Debian's packages when missing (or what to install)
	@softhsm/ensure-softhsm2.sh

$(NODE_STAMP): $(INTEROP)/package.json $(INTEROP)/package-lock.json
	@command -v npm >/dev/null || { echo "npm is missing: install Node.js 20 (Debian: apt-get install nodejs npm)" >&2; exit 1; }
	cd $(INTEROP) && npm ci --no-audit --no-fund --loglevel=error
	@touch $(NODE_STAMP)

node-deps: $(NODE_STAMP)  ## oidc-provider and jose for the interop tests

softhsm: install system-deps  ## repo-local development token .softhsm/ with a P-256 key (idempotent)
	@BIN=$(BIN) softhsm/dev-token.sh

demo: install  ## the whole DPoP flow on the development token against local servers
	@if $(MAKE) --no-print-directory system-deps softhsm; then \
		set -a; . $(SOFTHSM_DIR)/dev.env; set +a; \
	else \
		echo "SoftHSM2 is not available here: the demo uses a temporary PEM key instead" >&2; \
	fi; \
	$(BIN)/dpop demo

lint: install  ## ruff and mypy --strict
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy src tests bench

fmt: install  ## format and fix what ruff can
	$(BIN)/ruff format src tests bench
	$(BIN)/ruff check --fix src tests bench

test: install system-deps node-deps lint  ## everything: install, lint, type check, all tests
	$(BIN)/pytest $(PYTEST_ARGS)

bench: install system-deps softhsm  ## benchmarks, one table (not part of make test; BENCHMARKS.md)
	@set -a; . $(SOFTHSM_DIR)/dev.env; set +a; $(BIN)/python -m bench $(BENCH_ARGS)

clean:  ## remove the virtualenv, node_modules and the development token
	rm -rf $(VENV) $(INTEROP)/node_modules $(SOFTHSM_DIR) .mypy_cache .ruff_cache .pytest_cache
