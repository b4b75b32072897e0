"""The only doors between ranks: buffer-based messages to Cartesian neighbours (PLMR: L).

A rank can reach exactly the ranks beside it in the rank grid. Anything addressed elsewhere
raises :class:`LocalityError`; data for a far rank is forwarded neighbour by neighbour by the
fabric, so a long path costs the emulator real work too.
"""
from __future__ import annotations

import numpy as np
from mpi4py import MPI

from .errors import LocalityError

AXES = ("y", "x")  # Cartesian dimension 0 moves along a column (rows change), 1 along a row


class NeighbourLinks:
    """The links of one rank of a 2-D Cartesian communicator (``periods=False``)."""

    def __init__(self, cart: MPI.Cartcomm):
        self.cart = cart
        self.rank = cart.Get_rank()
        self.neighbours = {}
        for dim, axis in enumerate(AXES):
            lower, upper = cart.Shift(dim, 1)
            self.neighbours[(axis, -1)] = lower
            self.neighbours[(axis, +1)] = upper
        self._allowed = {r for r in self.neighbours.values() if r != MPI.PROC_NULL}

    def neighbour(self, axis: str, direction: int) -> int:
        """Rank one step along ``axis`` in ``direction`` (-1 or +1), or PROC_NULL at an edge."""
        return self.neighbours[(axis, direction)]

    def check(self, rank: int) -> None:
        if rank != MPI.PROC_NULL and rank not in self._allowed:
            raise LocalityError(
                f"rank {self.rank} tried to message rank {rank}, which is not a Cartesian "
                f"neighbour (neighbours: {sorted(self._allowed)}); far data must be forwarded")

    def sendrecv(self, send: np.ndarray, dest: int, recv: np.ndarray, source: int,
                 tag: int = 0) -> None:
        """Exchange contiguous numpy buffers with two neighbours (never pickled)."""
        self.check(dest)
        self.check(source)
        self.cart.Sendrecv(send, dest, tag, recv, source, tag)

    def exchange(self, messages, tag: int = 0) -> None:
        """Several ``(send, dest, recv, source[, tag])`` exchanges with neighbours at once (all
        posted, then all awaited), so that independent directions and kinds of message cost one
        synchronisation, not one each."""
        self.wait(self.post(messages, tag))

    @staticmethod
    def wait(requests: list) -> None:
        """Wait for the messages :meth:`post` posted."""
        MPI.Request.Waitall(requests)

    def post(self, messages, tag: int = 0) -> list:
        """:meth:`exchange`'s messages posted but not awaited (work that does not need them can
        go on meanwhile): the requests to :meth:`wait` for."""
        requests = []
        for send, dest, recv, source, *own in messages:
            self.check(dest)
            self.check(source)
            if source != MPI.PROC_NULL:     # beyond the mesh's edge: nothing comes, nothing goes
                requests.append(self.cart.Irecv(recv, source, own[0] if own else tag))
        for send, dest, recv, source, *own in messages:
            if dest != MPI.PROC_NULL:
                requests.append(self.cart.Isend(send, dest, own[0] if own else tag))
        return requests
