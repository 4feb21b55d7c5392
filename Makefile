# Every target that runs code depends on `setup`, so on a fresh clone `make demo` and `make test` are
# each one command.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PYTHON ?= python3

.PHONY: setup demo test test-fast cuda-check clean-venv

setup: $(STAMP)

# Reuse an installed torch when the system Python has one (the venv then sees system packages);
# otherwise install the pinned CPU build.
$(STAMP): pyproject.toml setup.py csrc/world_tokenizer.c
	@if $(PYTHON) -c "import torch" 2>/dev/null; then \
		echo "setup: reusing the installed torch"; $(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
		$(PYTHON) -m venv $(VENV); \
	fi
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[test]"
	@touch $(STAMP)

demo: setup
	$(PY) scripts/demo.py

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

# Compile every CUDA kernel for sm_90 with nvcc (no GPU needed) and tabulate registers, spills, shared memory.
cuda-check: setup
	$(PY) scripts/cuda_check.py

clean-venv:
	rm -rf $(VENV)
