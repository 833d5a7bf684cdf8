# dpop-signer: the two commands a fresh machine needs are `make demo` and `make test`.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# One stamp per install step, so that each target installs only what it needs: the demo and
# the development token need the package alone, lint/test/bench the dev and bench extras too.
VENV_STAMP := $(VENV)/.created
PKG_STAMP := $(VENV)/.installed-package
STAMP := $(VENV)/.installed
PIP := $(BIN)/pip install -q --disable-pip-version-check
INTEROP := tests/interop
NODE_STAMP := $(INTEROP)/node_modules/.installed
# authgent-server, the second independent authorization server of the interop tests, in a
# virtualenv of its own: its web stack stays out of ours.
AUTHGENT_VERSION := 0.3.4
AUTHGENT_VENV := .venv-authgent
AUTHGENT_STAMP := $(AUTHGENT_VENV)/.installed-$(AUTHGENT_VERSION)
SOFTHSM_DIR := .softhsm
BENCH_ARGS ?=
export SOFTHSM2_CONF ?= $(CURDIR)/$(SOFTHSM_DIR)/softhsm2.conf
PYTEST_ARGS ?=

.PHONY: help install install-package system-deps node-deps softhsm demo test lint fmt bench clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-16s %s\n", $$1, $$2}'

$(VENV_STAMP):
	@echo "==> creating the virtualenv $(VENV) and updating pip"
	$(PYTHON) -m venv $(VENV)
	@$(PIP) -U pip
	@touch $(VENV_STAMP)

$(PKG_STAMP): pyproject.toml $(VENV_STAMP)
	@echo "==> installing dpop-signer and its runtime dependencies into $(VENV) (about 70 MB)"
	$(PIP) -e .
	@touch $(PKG_STAMP)

$(STAMP): pyproject.toml $(PKG_STAMP)
	@echo "==> installing the dev and bench extras (test, lint and benchmark tools, about 160 MB more)"
	$(PIP) -e '.[dev,bench]'
	@touch $(STAMP)

install: $(STAMP)  ## virtualenv in .venv with the package and its dev and bench extras

install-package: $(PKG_STAMP)  ## virtualenv in .venv with the package alone (what `make demo` needs)

system-deps:  ## SoftHSM2 and p11-kit-modules from Debian's packages when missing (or what to install)
	@softhsm/ensure-softhsm2.sh

$(NODE_STAMP): $(INTEROP)/package.json $(INTEROP)/package-lock.json
	@command -v npm >/dev/null || { echo "npm is missing: install Node.js 20 (Debian: apt-get install nodejs npm)" >&2; exit 1; }
	cd $(INTEROP) && npm ci --no-audit --no-fund --loglevel=error
	@touch $(NODE_STAMP)

$(AUTHGENT_STAMP):
	@echo "==> installing authgent-server $(AUTHGENT_VERSION) into $(AUTHGENT_VENV) (interop tests)"
	rm -rf $(AUTHGENT_VENV)
	$(PYTHON) -m venv $(AUTHGENT_VENV)
	$(AUTHGENT_VENV)/bin/pip install -q --disable-pip-version-check 'authgent-server==$(AUTHGENT_VERSION)'
	@touch $(AUTHGENT_STAMP)

node-deps: $(NODE_STAMP)  ## oidc-provider and jose for the interop tests

softhsm: install-package system-deps  ## repo-local development token .softhsm/ with a P-256 key (idempotent)
	@BIN=$(BIN) softhsm/dev-token.sh

demo: install-package  ## the whole DPoP flow on the development token against local servers
	@echo "==> setting up the SoftHSM2 development token (.softhsm/)"
	@if $(MAKE) --no-print-directory system-deps softhsm; then \
		set -a; . $(SOFTHSM_DIR)/dev.env; set +a; \
	else \
		echo "SoftHSM2 is not available here: the demo uses a temporary PEM key instead" >&2; \
	fi; \
	echo "==> running dpop demo"; \
	$(BIN)/dpop demo

lint: install  ## ruff and mypy --strict
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy src tests bench

fmt: install  ## format and fix what ruff can
	$(BIN)/ruff format src tests bench
	$(BIN)/ruff check --fix src tests bench

test: install system-deps node-deps $(AUTHGENT_STAMP) lint  ## everything: install, lint, type check, all tests
	$(BIN)/pytest $(PYTEST_ARGS)

bench: install system-deps softhsm  ## benchmarks, one table (not part of make test; BENCHMARKS.md)
	@set -a; . $(SOFTHSM_DIR)/dev.env; set +a; $(BIN)/python -m bench $(BENCH_ARGS)

clean:  ## remove the virtualenv, node_modules and the development token
	rm -rf $(VENV) $(AUTHGENT_VENV) $(INTEROP)/node_modules $(SOFTHSM_DIR) .mypy_cache .ruff_cache .pytest_cache
