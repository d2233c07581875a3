# Two commands on a fresh machine: `make run` and `make test`. Everything installs into .venv.
# torch is pinned through constraints.txt to the CPU build that lies on this machine; see README for CUDA.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
HOST   ?= 127.0.0.1
PORT   ?= 8008
ARGS   ?=
PYTEST_ARGS ?=

INSTALLED      := $(VENV)/.installed
TEST_INSTALLED := $(VENV)/.installed-test
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: run test install install-test chromium tini tabby-agent bench clean

run: $(INSTALLED)
	$(VENV)/bin/refact-lab serve --host $(HOST) --port $(PORT) $(ARGS)

install: $(INSTALLED)

# Re-installs only when the project's requirements change, so a second `make run` starts in seconds.
$(INSTALLED): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade --quiet pip
	$(PIP) install --quiet -c constraints.txt -e .
	@touch $@

install-test: $(TEST_INSTALLED)

$(TEST_INSTALLED): $(INSTALLED)
	$(PIP) install --quiet -c constraints.txt -e '.[test]'
	@touch $@

# Browser tests drive Debian's Chromium (Playwright's own browser download is not reachable here).
chromium:
	@test -x /usr/bin/chromium || ( $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium >/dev/null )

# The Docker image's PID 1, for the test that stops the server under it (tests/serve/test_shutdown.py).
tini:
	@test -x /usr/bin/tini || ( $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq tini >/dev/null )

# Tabby's own client (the agent its IDE extensions run), from npm, for tests/clients/test_tabby_agent.py.
TABBY_AGENT := .cache/tabby-agent/node_modules/tabby-agent/dist/index.js
tabby-agent: $(TABBY_AGENT)

$(TABBY_AGENT):
	@command -v npm >/dev/null || ( $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq nodejs npm >/dev/null )
	npm install --silent --no-audit --no-fund --prefix .cache/tabby-agent tabby-agent@1.5.0

test: $(TEST_INSTALLED) chromium tini $(TABBY_AGENT)
	$(PY) -m pytest $(PYTEST_ARGS)

bench: $(INSTALLED)
	$(PY) bench/scan.py
	$(PY) bench/finetune.py
	$(PY) bench/serve.py
	$(PY) bench/default_model.py
	$(PY) bench/scan_secrets.py
	$(PY) bench/retrieval.py
	$(PY) bench/eval.py

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .cache
