"""Meshes for tests that run at every world size."""
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
