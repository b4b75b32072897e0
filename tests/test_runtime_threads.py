"""Each rank's BLAS threads are its share of the node's cores (:mod:`meshmpi.threads`)."""
from __future__ import annotations

import json
import os
import subprocess

import pytest

from meshmpi.threads import CHOSEN_BY_ENVIRONMENT

REPORT = """
import json, numpy
from threadpoolctl import threadpool_info
from meshmpi import share_cores
from mpi4py import MPI
cap = share_cores()
blas = [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]
reports = MPI.COMM_WORLD.gather([MPI.COMM_WORLD.Get_rank(), cap, blas])
if reports is not None:
    print(json.dumps(reports))
"""


def _reports(mpiexec_exe, python_exe, env, ranks):
    done = subprocess.run([mpiexec_exe, "-n", str(ranks), python_exe, "-c", REPORT], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return sorted(json.loads(done.stdout))


@pytest.mark.parametrize("ranks", [1, 2])
def test_each_rank_runs_its_share_of_the_cores_as_blas_threads(mpiexec_exe, python_exe, run_env, ranks):
    env = {k: v for k, v in run_env.items() if k not in CHOSEN_BY_ENVIRONMENT}
    share = max(1, len(os.sched_getaffinity(0)) // ranks)
    reports = _reports(mpiexec_exe, python_exe, env, ranks)
    assert [rank for rank, _, _ in reports] == list(range(ranks))
    for _, cap, blas in reports:
        assert cap == share
        assert blas and all(threads == share for threads in blas)


def test_a_thread_count_the_environment_chose_is_kept(mpiexec_exe, python_exe, run_env):
    env = {k: v for k, v in run_env.items() if k not in CHOSEN_BY_ENVIRONMENT}
    env["OPENBLAS_NUM_THREADS"] = "1"
    for _, cap, blas in _reports(mpiexec_exe, python_exe, env, 1):
        assert cap is None
        assert blas == [1]
