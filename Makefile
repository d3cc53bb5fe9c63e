# passlab: `make demo` and `make test` do all the set-up on a fresh machine.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: demo test test-all bench bench-overlap gpu-check sysdeps clean

$(PY):
	python3 -m venv $(VENV)

# torch 2.13.0 (CPU) first, from local disk where it lies there: a bare `torch`
# requirement would otherwise pull a multi-GB CUDA build.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,hf,mlir]'
	touch $(STAMP)

sysdeps:
	@if command -v dot >/dev/null && command -v chromium >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing graphviz and chromium (apt-get)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq graphviz chromium >/dev/null; \
	else echo "NOTE: graphviz (dot) and chromium are missing and this is not root: drawing and report tests will skip. Install them with: sudo apt-get install graphviz chromium"; fi

demo: $(STAMP) sysdeps
	$(VENV)/bin/passlab run transformer --preset bench --json out/demo/run.json --report out/demo/report

test: $(STAMP) sysdeps
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

test-all: $(STAMP) sysdeps
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: $(STAMP)
	$(VENV)/bin/python -m passlab.tools.bench --write-readme

# the MoE case study: overlap passes on the emulated link at W=2 and 4, the simulator beside them (root: namespaces)
bench-overlap: $(STAMP)
	$(VENV)/bin/python -m passlab.tools.bench_overlap --write-readme

# On a CUDA machine with torch and triton preinstalled and no network: the image's python3,
# an editable install that fetches nothing (where pip cannot build it, `passlab` is put on
# PYTHONPATH through a link), then the GPU check (within 8 minutes on an H200).
GPU_PY ?= python3
GPU_OUT ?= out/gpu-check
gpu-check:
	$(GPU_PY) -m pip install -q --no-deps --no-build-isolation --no-index -e . || \
	  { mkdir -p /tmp/passlab-path && ln -sfn "$$PWD" /tmp/passlab-path/passlab; }
	PYTHONPATH=/tmp/passlab-path:$$PYTHONPATH $(GPU_PY) -m passlab.tools.gpu_check --out $(GPU_OUT) $(GPU_ARGS)

clean:
	rm -rf $(VENV) out .passlab-cache
