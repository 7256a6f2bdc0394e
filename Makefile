# The two commands a fresh machine needs (each creates .venv on first use):
#   make demo   run a local testnet: coordinator + 4 nodes, one malicious
#   make test   run the whole test suite
#   make test-fast   unit and in-process gRPC tests only (no daemons as subprocesses)
# TORCH_SPEC picks the torch build; the default is the CPU wheel this project is tested with.

VENV ?= .venv
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.pipeguard-installed

.PHONY: demo test test-fast venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/pipeguard testnet

test: $(STAMP)
	$(PY) -m pytest

test-fast: $(STAMP)
	$(PY) -m pytest -m "unit or grpc"

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
