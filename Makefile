# Two commands: `make run` (the whole loop on the embedded default) and `make test` (the suite).
# Both build .venv from uv.lock first; package caches stay outside the checkout (~/.cache).
# `make services` / `make services-stop`: a local Kafka broker and redis-server (the URLs are
# printed and kept in ~/.cache/kto-loop/services/default/env); `make test` starts its own.

SHELL := /bin/bash
PYTHON ?= python3
CACHE ?= $(HOME)/.cache/kto-loop
export UV_CACHE_DIR ?= $(HOME)/.cache/uv
export UV_PYTHON_DOWNLOADS := never
UV := $(CACHE)/uv/bin/uv
VENV_STAMP := .venv/.synced

.PHONY: run test lint bench setup clean services services-stop screenshot

run: $(VENV_STAMP)
	.venv/bin/kto-loop up

# Lint, format, the layers contract and types first (seconds), then the tests.
test: $(VENV_STAMP) lint
	.venv/bin/python -m pytest $(PYTEST_ARGS)

lint: $(VENV_STAMP)
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/lint-imports
	.venv/bin/mypy

bench: $(VENV_STAMP)
	.venv/bin/python -m bench $(BENCH_ARGS)

setup: $(VENV_STAMP)

# The README's picture of the chat page, taken by its browser test (headless Chromium).
screenshot: $(VENV_STAMP)
	KTO_SCREENSHOT=$(CURDIR)/docs/chat-page.png .venv/bin/python -m pytest tests/serve/test_chat_page.py -q -k rates

# Standard library only, so these need no .venv.
SERVICES := $(PYTHON) deploy/services/services.py --cache-dir $(CACHE)

services:
	$(SERVICES) start

services-stop:
	$(SERVICES) stop

# uv itself comes from PyPI into a small venv of its own (works where system pip is locked down).
$(UV):
	$(PYTHON) -m venv $(CACHE)/uv
	$(CACHE)/uv/bin/pip install --quiet --disable-pip-version-check uv

$(VENV_STAMP): $(UV) pyproject.toml uv.lock
	$(UV) sync --locked --python $(PYTHON)
	touch $@

clean:
	rm -rf .venv data
