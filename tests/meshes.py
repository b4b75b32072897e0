"""Meshes, rings and schedules shared by tests that run at every world size."""
import numpy as np
from mpi4py import MPI

from meshmpi import Mesh, load_hardware


def fits(rows, cols, size=None):
    """Whether some rank grid of ``size`` ranks (default: the world) fits a rows x cols mesh."""
    size = MPI.COMM_WORLD.Get_size() if size is None else size
    return any(size % ry == 0 and ry <= rows and size // ry <= cols for ry in range(1, size + 1))


def make_mesh(rows, cols, hardware="wse2", **kwargs):
    """A mesh over the world's ranks, or over this rank alone when the mesh is too small."""
    comm = MPI.COMM_WORLD if fits(rows, cols) else MPI.COMM_SELF
    return Mesh(rows, cols, load_hardware(hardware), comm=comm, **kwargs)


def ring_order(n):
    """MeshGEMM's interleaved ring (PAPER.md §2): even indices ascending, then odd descending."""
    return list(range(0, n, 2)) + list(range(n - 1 if n % 2 == 0 else n - 2, 0, -2))


def ring_dest(n: int, steps: int = 1) -> np.ndarray:
    """dest[i]: where position i sends in one ring step (``steps`` < 0 turns the other way)."""
    order = ring_order(n)
    dest = np.empty(n, np.int64)
    for p, i in enumerate(order):
        dest[i] = order[(p + steps) % n]
    return dest


KNOWN_TILE = 5   # elements of the tile that known_schedule shifts


def known_schedule(mesh):
    """A small schedule whose trace numbers tests/test_runtime_trace.py works out by hand: a
    shift by +1 along x of a 5-element tile (phase "shift", one step), then 10 FLOPs on every
    core (phase "compute", one step)."""
    tile = mesh.alloc("tile", (KNOWN_TILE,), np.float32)
    with mesh.phase("shift"), mesh.fabric.scope():
        mesh.fabric.shift("east", "x", 1).run(tile)
        mesh.step("one hop")
    with mesh.phase("compute"):
        mesh.compute(10)
        mesh.step("flops")
    return tile
