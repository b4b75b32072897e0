"""Shared fixtures for the runtime tests.

Tests marked ``mpi`` run on every rank of ``mpiexec -n N python -m pytest --with-mpi``; they
must make the same collective calls in the same order on every rank, so the helpers here
share results with every rank before anything is asserted.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
from mpi4py import MPI

from meshmpi import Mesh, load_hardware, share_cores
from meshmpi.host import gather_block_arrays

REPO = Path(__file__).resolve().parents[1]
# Every mesh of the tests (and of the commands they start) checks for buffers used in flight.
os.environ["MESHMPI_HAZARD_CHECKS"] = "1"
HELPERS = Path(__file__).resolve().parent / "helpers"
# As every command does: each rank's BLAS threads are its share of the node's cores.
share_cores()


@pytest.fixture
def world():
    return MPI.COMM_WORLD


@pytest.fixture
def new_mesh():
    """``new_mesh(rows, cols, **kwargs)``: a Mesh freed (collectively) when the test ends."""
    made = []

    def make(rows, cols, hardware=None, **kwargs):
        mesh = Mesh(rows, cols, hardware or load_hardware("wse2"), **kwargs)
        made.append(mesh)
        return mesh

    yield make
    for mesh in made:
        mesh.free()


@pytest.fixture
def gather_full():
    """``gather_full(mesh, {name: block array})``: full ``[rows, cols]`` arrays on every rank."""

    def gather(mesh, arrays: dict) -> dict:
        full = gather_block_arrays(mesh, {k: np.asarray(v) for k, v in arrays.items()}, root=0)
        return mesh.cart.bcast(full, root=0)

    return gather


@pytest.fixture
def run_env():
    """Environment for launching a fresh Python or mpiexec: no inherited MPI/PMI/SLURM job state."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PMI_", "PMIX_", "HYDRA_", "MPIR_", "MPICH_", "SLURM_", "OMPI_"))}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


@pytest.fixture
def python_exe() -> str:
    return sys.executable


@pytest.fixture
def mpiexec_exe() -> str:
    """The mpiexec installed beside this Python (the ``mpich`` wheel's)."""
    path = Path(sys.executable).parent / "mpiexec"
    if not path.exists():
        pytest.skip(f"no mpiexec beside {sys.executable}")
    return str(path)


@pytest.fixture
def helper_script():
    """Path of a script in tests/helpers/."""
    return lambda name: str(HELPERS / name)


def pytest_report_header(config):
    return f"runtime tests: python {sys.executable}, MPI world size {MPI.COMM_WORLD.Get_size()}"
