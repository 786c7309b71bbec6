# Two entry points for a fresh machine: `make demo` and `make test` (`make test-fast` while editing).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU machines take the torch build pinned here (on local disk on the project's machines);
# a machine with CUDA keeps whatever torch satisfies the package's range.
TORCH_CPU ?= torch==2.13.0

.PHONY: venv demo test test-fast lint clean

# Two stamps: the runtime (all `make demo` needs) and the test extras on top (ray, moto, playwright,
# daft: only the tests use them), so a fresh clone's demo does not wait for the test tooling.
$(VENV)/.runtime: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1; then echo "CUDA found: torch from the package range"; \
	else $(BIN)/pip install --quiet "$(TORCH_CPU)"; fi
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.dev: $(VENV)/.runtime
	$(BIN)/pip install --quiet -e ".[dev]"
	# Daft reads the lake in tests/unit/test_engines.py. Its 0.7 releases declare pyarrow<26 but run on
	# the pyarrow 26 VRP needs, so it is installed without its pins (it cannot sit in [dev]: pip
	# would find no pyarrow that satisfies both).
	$(BIN)/pip install --quiet --no-deps "daft>=0.7.26,<0.8"
	touch $@

venv: $(VENV)/.dev

demo: $(VENV)/.runtime
	$(BIN)/vrp demo

# everything: tests/unit (no model), tests/models (tiny checkpoints), tests/e2e (whole runs)
test: venv
	$(BIN)/python -m pytest -q

# the edit-run loop: the unit tests, which load no model and start no run
test-fast: venv
	$(BIN)/python -m pytest -q tests/unit

lint: venv
	$(BIN)/ruff check vrp tests benchmarks

clean:
	rm -rf $(VENV) vrp-lake vrp-report .pytest_cache
