# jaxser: `make demo` and `make test` each do all set-up on a fresh machine (Python 3.11).
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
WORKDIR ?= runs/demo
# Accelerator build of jax: cpu (requirements.txt alone), cuda (CUDA 12 plugin and runtime
# wheels, requirements-cuda.txt) or cuda13 (requirements-cuda13.txt). On a GPU node:
#   make install ACCEL=cuda
ACCEL ?= cpu
ifeq ($(ACCEL),cpu)
ACCEL_REQS :=
STAMP := $(VENV)/.installed
else
ACCEL_REQS := requirements-$(ACCEL).txt
STAMP := $(VENV)/.installed-$(ACCEL)
ifeq ($(wildcard $(ACCEL_REQS)),)
$(error ACCEL=$(ACCEL): no $(ACCEL_REQS); use ACCEL=cpu, cuda or cuda13)
endif
endif

.PHONY: install demo test test-slow lint clean

install: $(STAMP)

# Re-installs only when the pins or the package metadata change.
$(STAMP): requirements.txt requirements-test.txt $(ACCEL_REQS) setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.txt -r requirements-test.txt$(if $(ACCEL_REQS), -r $(ACCEL_REQS))
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $(STAMP)

demo: install
	$(BIN)/jaxser demo --workdir $(WORKDIR)

# The default suite (well under 15 minutes on 2 CPU cores).
test: install
	$(BIN)/python -m pytest -m "not slow" tests

# Multi-process, kill/resume, end-to-end and method-config runs (CI runs them too).
test-slow: install
	$(BIN)/python -m pytest -m slow tests

lint: install
	$(BIN)/ruff check jaxser tests bench configs

clean:
	rm -rf $(VENV) runs .pytest_cache
