# All set-up lives here: `make test` and `make pretrain` create .venv on a fresh machine when it is missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: test lint pretrain bench bench-dry venv clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

venv: $(BIN)/.installed

# The unit tests, then every bench body once at tiny sizes on whatever device is here (so the benches never rot).
test: $(BIN)/.installed
	$(BIN)/python -m pytest -q
	$(BIN)/python -m pytest -q benches/ --benchmark-disable

lint: $(BIN)/.installed
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench-dry: $(BIN)/.installed
	$(BIN)/python -m pytest -q benches/ --benchmark-disable

# The one-command GPU report (see BENCHMARKS.md).
bench: $(BIN)/.installed
	$(BIN)/python benches/report.py

# The static resource table of every kernel as an MAE step launches it (offline sm_90a compiles, cached; no GPU).
.PHONY: static
static: $(BIN)/.installed
	$(BIN)/python -m benches.static_report

# The demo starts afresh each time (runs/demo is its own output folder).
pretrain: $(BIN)/.installed
	rm -rf runs/demo
	$(BIN)/python training/pretrain.py --preset demo

clean:
	rm -rf $(VENV) runs .pytest_cache
