# The two commands the README leads with: `make demo` and `make test`. Both install what they need.
VENV ?= .venv
PYTHON ?= python3
# On the project's 2-core CPU machines this pin takes the CPU wheel from local disk; elsewhere,
# set TORCH_SPEC to the torch build your machine needs (e.g. TORCH_SPEC=torch for CUDA).
TORCH_SPEC ?= torch==2.13.0
# The other packages at the versions in constraints.txt (the suite's last pass); UNPINNED=1 takes the newest.
CONSTRAINTS := $(if $(UNPINNED),,-c constraints.txt)
BIN := $(VENV)/bin

.PHONY: demo test test-fast lint install clean

$(BIN)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q $(CONSTRAINTS) -e ".[dev]"
	touch $@

install: $(BIN)/.installed

demo: $(BIN)/.installed
	$(BIN)/trasce demo --out outputs/demo

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q

test-fast: $(BIN)/.installed
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(BIN)/.installed
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) outputs
