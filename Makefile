# make demo: set up and run the default job (2 ranks, CPU/gloo, synthetic data, ~30 s)
# make test: set up and run the test suite (the command CI runs)
# make compat: the distributed core on torch 2.11 and 2.14.1, each in its own venv (CI runs it too)
VENV  ?= .venv
PY    := $(VENV)/bin/python
# torch 2.13.0: a CPU build on the project's machines; set TORCH=torch for the newest.
TORCH ?= torch==2.13.0
NPROC ?= 2

.PHONY: setup demo test compat lint clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	PYTHON=$(PY) SPLITGRAPH_RUN_DIR=outputs/demo launch/train.sh $(NPROC) checkpoint.resume=never

# Two workers (pytest-xdist), one test file (or shared launch) per group: the suite's launches
# and single-process tests overlap on 2 cores. PYTEST_WORKERS=0 runs it in one process.
PYTEST_WORKERS ?= 2
test: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadgroup

compat:
	.ci/compat

lint: setup
	$(VENV)/bin/ruff check splitgraph tests

clean:
	rm -rf outputs multirun .pytest_cache
