# Two commands: `make run` (install and serve on http://127.0.0.1:8000) and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
UV_VERSION := 0.13.9
UV := $(shell command -v uv 2>/dev/null || echo .tools/bin/uv)
# Trust the system certificate store (corporate proxies, custom CAs).
export UV_SYSTEM_CERTS ?= 1
HOST ?= 127.0.0.1
PORT ?= 8000
# The websocket layer refuses frames over the server's frame limit (bytes), as in the Procfile;
# the client IP comes from TRUSTED_PROXIES, never from uvicorn's proxy headers.
MAX_FRAME_BYTES ?= 65536
UVICORN_FLAGS := --ws-per-message-deflate false --no-proxy-headers --ws-max-size $(MAX_FRAME_BYTES)

.PHONY: install install-node install-system install-browser install-bench run run-firestore test bench lint format clean

# uv (the installer behind the lock file) in a small venv of its own when it is not on PATH.
$(UV):
	$(PYTHON) -m venv .tools
	.tools/bin/pip install --quiet "uv==$(UV_VERSION)"

.venv/.installed: $(UV) pyproject.toml uv.lock Makefile
	$(UV) sync --frozen --extra aws
	touch $@

install: .venv/.installed

node_modules/.installed: package.json package-lock.json
	tests/support/install_system.sh node:nodejs npm:npm
	command -v npm >/dev/null || { echo "node and npm are required (Debian/Ubuntu: nodejs npm)"; exit 1; }
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

install-node: node_modules/.installed

# Programs the tests run: Redis >= 7 (server and cli) and openssl, from Debian/Ubuntu
# packages (sudo when not root). What cannot be installed is named; its tests are skipped,
# or fail under CI=true.
install-system:
	tests/support/install_system.sh redis-server:redis-server redis-cli:redis-tools openssl:openssl

# Headless Chromium for the demo page test (the same rules).
install-browser:
	tests/support/install_system.sh chromium:chromium
	@# Emoji glyphs for the demo page's reactions in screenshots (the tests do not need them).
	@fc-list 2>/dev/null | grep -qi "color emoji" || { SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends fonts-noto-color-emoji >/dev/null 2>&1 \
	  || echo "install-browser: fonts-noto-color-emoji not installed: emoji show as boxes in screenshots"; }

run: install
	$(UV) run --frozen uvicorn server.main:app --host $(HOST) --port $(PORT) $(UVICORN_FLAGS)

FIRESTORE_PORT ?= 8085
# The same server on a local Firestore emulator (in memory: emptied when it stops).
run-firestore: install install-node
	node tests/support/firestore_emulator.js $(FIRESTORE_PORT) & \
	  trap "kill $$! 2>/dev/null" EXIT INT TERM; \
	  for i in $$(seq 50); do (exec 3<>/dev/tcp/127.0.0.1/$(FIRESTORE_PORT)) 2>/dev/null && break; sleep 0.2; done; \
	  STORE=firestore FIRESTORE_EMULATOR_HOST=127.0.0.1:$(FIRESTORE_PORT) FIRESTORE_PROJECT=demo-chat \
	  $(UV) run --frozen uvicorn server.main:app --host $(HOST) --port $(PORT) $(UVICORN_FLAGS)

test: install install-node install-system install-browser
	$(UV) run --frozen pytest $(PYTEST_ARGS)

# The side-by-side benchmark's Node tools (reference server, load generator), locked apart
# from the test suite's.
bench/node/node_modules/.installed: bench/node/package.json bench/node/package-lock.json
	command -v node >/dev/null || (apt-get update -qq && apt-get install -y -qq nodejs npm)
	cd bench/node && npm ci --no-audit --no-fund --loglevel=error
	touch $@

install-bench: bench/node/node_modules/.installed
	@command -v redis-server >/dev/null || (apt-get update -qq && apt-get install -y -qq redis-server)

# This server against Node's Socket.IO on this machine (docs/benchmarks.md); takes minutes.
# RATES="100 200 500 2000" DUR=8 IDLE=1 as in ../shared/bench/compare.sh.
bench: install install-bench
	.venv/bin/python -m bench.side_by_side

lint: install
	$(UV) run --frozen ruff check server tests bench
	$(UV) run --frozen ruff format --check server tests bench
	$(UV) run --frozen lint-imports
	$(UV) run --frozen mypy

format: install
	$(UV) run --frozen ruff format server tests bench
	$(UV) run --frozen ruff check --fix server tests bench

clean:
	rm -rf .venv .tools node_modules bench/node/node_modules .pytest_cache .ruff_cache .run data
