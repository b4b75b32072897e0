"""Only one rank fails while the others wait for it: ``one_rank_fails.py MODE``.

MODE ``crash``: rank 2 raises a plain exception; ``locality``: rank 2 messages a far rank
(a non-collective meshmpi error); ``usage``: every rank raises the same UsageError. The
ranks that do not fail block in a Sendrecv with rank 2 and then in a barrier.
"""
import sys

import numpy as np
from mpi4py import MPI

from meshmpi import Mesh, UsageError, cli, load_hardware


def main(argv):
    mode = argv[0]
    comm = MPI.COMM_WORLD
    if mode == "usage":
        raise UsageError("the same bad input on every rank")
    mesh = Mesh(1, 8, load_hardware("wse2"), rank_grid=(1, comm.size)) if mode == "locality" else None
    if comm.rank == 2:
        if mode == "crash":
            raise RuntimeError("rank two gave up: " + "-".join(("boom", "7f3a")))  # not in the source line
        mesh.links.sendrecv(np.zeros(1), 0, np.zeros(1), 0)  # two ranks away: LocalityError
    buf = np.zeros(1)
    comm.Sendrecv(np.ones(1), dest=2, recvbuf=buf, source=2)  # waits forever for rank 2
    comm.Barrier()
    return 0


if __name__ == "__main__":
    cli.run(main, sys.argv[1:])
