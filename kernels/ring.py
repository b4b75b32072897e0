"""The interleaved ring of MeshGEMM (PAPER.md §2) and the plain ring of Cannon.

The interleaved ring visits even indices ascending, then odd indices descending, so every
edge of the ring spans at most 2 hops on a line without wrap-around (N=4: 0->2->3->1->0).
"""
from __future__ import annotations

import numpy as np


class Ring:
    """A cyclic order of the positions ``0..n-1`` of a line."""

    def __init__(self, order):
        self.order = np.asarray(order, np.int64)
        self.n = self.order.size
        self.position = np.empty(self.n, np.int64)
        self.position[self.order] = np.arange(self.n)

    def send(self) -> np.ndarray:
        """``send[i]``: where index i sends in one ring step (``ring[(pos(i)+1) mod N]``)."""
        return self.order[(self.position + 1) % self.n]

    def recv(self) -> np.ndarray:
        """``recv[i]``: where index i receives from (``ring[(pos(i)-1) mod N]``)."""
        return self.order[(self.position - 1) % self.n]

    def max_hops(self) -> int:
        return int(np.abs(self.send() - np.arange(self.n)).max()) if self.n > 1 else 0


def interleaved_ring(n: int) -> Ring:
    """MeshGEMM's ring: ``0, 2, 4, ..., then the odd indices descending``."""
    if n < 1:
        raise ValueError("a ring needs at least one position")
    evens = np.arange(0, n, 2)
    odds = np.arange(1, n, 2)[::-1]
    return Ring(np.concatenate([evens, odds]))


def plain_ring(n: int) -> Ring:
    """Cannon's ring ``0, 1, ..., n-1``: its wrap edge spans n-1 hops on a mesh."""
    if n < 1:
        raise ValueError("a ring needs at least one position")
    return Ring(np.arange(n))
