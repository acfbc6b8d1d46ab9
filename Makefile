# jaxser: `make demo` and `make test` each do all set-up on a fresh machine (Python 3.11).
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
WORKDIR ?= runs/demo

.PHONY: install demo test test-fast lint bench clean

install: $(STAMP)

# Re-installs only when the pins or the package metadata change.
$(STAMP): requirements.txt requirements-test.txt setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.txt -r requirements-test.txt
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $(STAMP)

demo: install
	$(BIN)/jaxser demo --workdir $(WORKDIR)

test: install
	$(BIN)/python -m pytest tests

test-fast: install
	$(BIN)/python -m pytest -m "not slow" tests

lint: install
	$(BIN)/ruff check jaxser tests bench configs

clean:
	rm -rf $(VENV) runs .pytest_cache
