"""BLAS threads per rank: the ranks on one node share its cores.

numpy's BLAS starts one thread per core in every process. With several ranks on a node, each
rank's tile products then run as many threads as the node has cores, and the threads of all
ranks spin against each other: a numeric MeshGEMM on 2 ranks of a 2-core machine ran 10 to 25
times slower than with one thread per rank. So every command (:func:`meshmpi.cli.run`) first
caps each rank's BLAS pool at the cores it may use divided by the ranks on its node (at least
1), unless the environment already chose (``OMP_NUM_THREADS``, ``OPENBLAS_NUM_THREADS`` or
``MKL_NUM_THREADS``). A script that builds meshes itself calls :func:`share_cores` first.
"""
from __future__ import annotations

import os

from mpi4py import MPI

CHOSEN_BY_ENVIRONMENT = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")

_limited = None


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask, where the system has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def share_cores() -> int | None:
    """Cap this process's BLAS threads at its share of its node's cores. Collective over
    ``MPI.COMM_WORLD`` the first time, a no-op after. Returns the cap, or None where the
    environment set one."""
    global _limited
    if _limited is None:
        node = MPI.COMM_WORLD.Split_type(MPI.COMM_TYPE_SHARED)
        ranks_here = node.Get_size()
        node.Free()
        if any(os.environ.get(var) for var in CHOSEN_BY_ENVIRONMENT):
            _limited = 0
        else:
            from threadpoolctl import threadpool_limits
            _limited = max(1, usable_cores() // ranks_here)
            threadpool_limits(limits=_limited, user_api="blas")
    return _limited or None
