# The two commands of the README's quick start: `make demo` and `make test`.
# Both create the virtual environment .venv in the checkout and install fpstore into it, with
# the Ray and S3 extras and the lint tools, so that the reliability tests run everywhere.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_DIR ?= fpstore-demo
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow lint bench bench-smoke install clean

$(STAMP): setup.cfg pyproject.toml scripts/install.sh
	PYTHON=$(PYTHON) VENV=$(VENV) bash scripts/install.sh
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/fpstore demo --out $(DEMO_DIR) --force

test: $(STAMP)
	bash scripts/run-tests.sh

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow -q

# Every benchmark at its smallest size (figures not checked: that each still runs).
bench-smoke: $(STAMP)
	$(BIN)/python benchmarks/smoke.py

# Style, formatting, the import layers (pyproject.toml [tool.importlinter]) and types.
lint: $(STAMP)
	$(BIN)/ruff check fpstore cli tests benchmarks
	$(BIN)/ruff format --check fpstore cli tests benchmarks
	cd $(CURDIR) && $(BIN)/lint-imports
	$(BIN)/mypy

clean:
	rm -rf $(VENV) $(DEMO_DIR) build *.egg-info
