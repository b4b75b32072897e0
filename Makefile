# Two entry points that do all set-up from nothing: `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
MPIEXEC = $(VENV)/bin/mpiexec
STAMP   = $(VENV)/.installed
# pytest under MPI: every rank runs the same collected tests.
MPI_PYTEST = $(PY) -m pytest -q --with-mpi -m mpi -x tests

.PHONY: install run test test-serial test-mpi test-slurm bench clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q --config-settings editable_mode=compat -e '.[mpich,llm,plot,test]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(MPIEXEC) -n 4 $(PY) -m llm generate --model tiny --prompt "The meaning of" \
	    --max-new-tokens 24 --mesh 8x8 --trace results/run/generate.h5 --force
	$(PY) -m meshmpi trace summary results/run/generate.h5

test: $(STAMP) test-serial test-mpi test-slurm

test-serial: $(STAMP)
	$(PY) -m pytest -q -m "not slurm" tests

test-mpi: $(STAMP)
	$(MPIEXEC) -n 1 $(MPI_PYTEST)
	$(MPIEXEC) -n 2 $(MPI_PYTEST)
	$(MPIEXEC) -n 4 $(MPI_PYTEST)

test-slurm: $(STAMP)
	$(PY) -m pytest -q tests/slurm

bench: $(STAMP)
	$(PY) -m kernels bench all --out results
	$(MPIEXEC) -n 2 $(PY) -m llm bench --out results
	$(PY) -m llm bench --models llama3-8b --e2e --prefill-side 660 --meshes 360 --out results

clean:
	rm -rf $(VENV) *.egg-info
