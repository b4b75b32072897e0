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


# Report fields that may differ between a numeric and a dry run, or between rank splits.
RUN_DEPENDENT_FIELDS = ("wall_seconds", "max_abs_err", "check", "check_failure", "ranks", "dry_run")


def modeled(report: dict) -> dict:
    """A kernel report without the fields that depend on how it was run."""
    return {k: v for k, v in report.items() if k not in RUN_DEPENDENT_FIELDS}


def record_live_buffers(mesh) -> list:
    """From now on, at the end of every phase, append (phase name, {buffer: bytes on this
    block's fullest core}, bytes resident on this block's fullest core) to the returned list.
    Per rank: read it through :func:`whole_mesh_buffers`."""
    seen, end = [], mesh.timeline.end

    def end_and_record():
        timeline, memory = mesh.timeline, mesh.memory
        name = timeline.phases[timeline._open[-1]]["name"]
        seen.append((name, memory.live(), memory.most_resident()))
        end()

    mesh.timeline.end = end_and_record
    return seen


def whole_mesh_buffers(mesh, seen: list) -> list:
    """The records of :func:`record_live_buffers` for the whole mesh (the max over ranks of
    each buffer and of the resident bytes), the same on every rank; ``seen`` is emptied."""
    merged = []
    for records in zip(*mesh.cart.allgather(list(seen))):
        name = records[0][0]
        live = {}
        for _, buffers, _ in records:
            for buffer, size in buffers.items():
                live[buffer] = max(live.get(buffer, 0), size)
        merged.append((name, live, max(r[2] for r in records)))
    seen.clear()
    return merged
