"""PLMR L: ranks exchange messages only with Cartesian neighbours, and only meshmpi talks MPI."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import numpy as np
import pytest
from mpi4py import MPI

from meshmpi import LocalityError

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.mpi(min_size=4)
def test_sending_two_ranks_away_raises_locality_error(new_mesh, world):
    if world.size != 4:
        pytest.skip("needs exactly 4 ranks for a 1x4 rank grid")
    mesh = new_mesh(2, 8, rank_grid=(1, 4))
    links = mesh.links
    far = (mesh.rank + 2) % 4  # never beside this rank on a line of 4 ranks
    send, recv = np.arange(3, dtype=np.float64), np.empty(3)
    # Every rank addresses a far rank: each raises locally, before any message, so none blocks.
    with pytest.raises(LocalityError, match=f"rank {far}"):
        links.sendrecv(send, far, recv, far)
    # A far source with a legal destination is refused too.
    right = links.neighbour("x", +1)
    with pytest.raises(LocalityError):
        links.sendrecv(send, right, recv, far)
    # Neighbours do exchange: pass rank ids one step right.
    left = links.neighbour("x", -1)
    send[:] = mesh.rank
    recv[:] = -1
    links.sendrecv(send, right, recv, left)
    assert np.all(recv == (mesh.rank - 1 if mesh.rank > 0 else -1))
    assert links.neighbour("y", -1) == links.neighbour("y", +1) == MPI.PROC_NULL


@pytest.mark.mpi(min_size=4)
def test_diagonal_rank_is_not_a_neighbour(new_mesh, world):
    if world.size != 4:
        pytest.skip("needs exactly 4 ranks for a 2x2 rank grid")
    mesh = new_mesh(4, 4, rank_grid=(2, 2))
    y, x = mesh.coords
    diagonal = mesh.cart.Get_cart_rank([1 - y, 1 - x])
    buf = np.zeros(1)
    with pytest.raises(LocalityError):
        mesh.links.sendrecv(buf, diagonal, np.zeros(1), MPI.PROC_NULL)


def mpi_imports(source: str) -> list[str]:
    """Lines of ``source`` that import mpi4py (statically or through importlib/__import__)."""
    try:
        tree = ast.parse(source)
    except SyntaxError:  # a file mid-edit: fall back to a textual check
        return [m.group(0) for m in re.finditer(
            r"^\s*(?:from\s+mpi4py\b|import\s+[\w., ]*\bmpi4py\b).*$", source, re.M)]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0] == "mpi4py"]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "mpi4py":
            found.append(node.module)
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            name = getattr(node.func, "attr", getattr(node.func, "id", ""))
            if name in ("import_module", "__import__") and str(node.args[0].value).startswith("mpi4py"):
                found.append(str(node.args[0].value))
    return found


def test_only_meshmpi_imports_mpi4py():
    assert mpi_imports("from mpi4py import MPI") and mpi_imports("import os, mpi4py.MPI")
    assert mpi_imports("importlib.import_module('mpi4py.MPI')")
    assert not mpi_imports('"""never imports mpi4py"""\nimport numpy')
    assert mpi_imports((REPO / "meshmpi" / "links.py").read_text()), "the scan finds nothing"
    offenders = {}
    for folder in ("kernels", "llm"):
        for path in sorted((REPO / folder).rglob("*.py")):
            try:
                text = path.read_text()
            except (OSError, UnicodeDecodeError):  # removed or rewritten while we look
                continue
            if mpi_imports(text):
                offenders[str(path.relative_to(REPO))] = mpi_imports(text)
    assert not offenders, f"only meshmpi/ may import mpi4py: {offenders}"
