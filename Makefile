# The two commands of the README's quick start: `make demo` and `make test`.
# Both create the virtual environment .venv in the checkout and install fpstore into it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_DIR ?= fpstore-demo
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow bench install clean

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

clean:
	rm -rf $(VENV) $(DEMO_DIR) build *.egg-info
