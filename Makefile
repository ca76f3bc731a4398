# All set-up lives here: `make test` and `make pretrain` create .venv on a fresh machine when it is missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: test test-capability lint pretrain bench bench-dry venv clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

venv: $(BIN)/.installed

# Tests run on every core (pytest-xdist); modules with a module-scoped run stay on one worker (xdist_group).
XDIST := -n auto --dist loadgroup

# The unit tests, then every bench body once at tiny sizes on whatever device is here (so the benches never rot).
test: $(BIN)/.installed
	$(BIN)/python -m pytest -q $(XDIST)
	$(BIN)/python -m pytest -q $(XDIST) benches/ --benchmark-disable

# The numerical kernel tests again under another ATen CPU kernel set (the eager fp32 references they compare
# against differ between AVX-512, AVX2 and plain builds): CAPABILITY=default|avx2|avx512.
CAPABILITY ?= default
test-capability: $(BIN)/.installed
	ATEN_CPU_CAPABILITY=$(CAPABILITY) $(BIN)/python -m pytest -q $(XDIST) tests/test_attention.py \
		tests/test_masked_mse.py -k "not compiles"

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
