"""Mesh arrays: one tile per core, stored per rank as one numpy array ``(block_rows, block_cols, *tile)``.

In a dry run ``data`` is ``None``: the array still has its shape, dtype and memory charge,
so every transfer and allocation is accounted exactly as in a numeric run.
"""
from __future__ import annotations

import math

import numpy as np

from .errors import HazardError


class MeshArray:
    """``data`` is this rank's payload; while a transfer into the array is in flight (between
    the pattern's ``start`` and ``wait``) touching it raises :class:`HazardError`, because on
    the wafer the destination holds the new tiles only after the receive completes."""

    def __init__(self, mesh, name: str, tile_shape: tuple, dtype: np.dtype):
        self.mesh = mesh
        self.name = name
        self.tile_shape = tuple(tile_shape)
        self.dtype = np.dtype(dtype)
        self._data: np.ndarray | None = None
        self.incoming = None     # the pattern whose transfer into this array is in flight
        self.layout = None       # where the global array lives (meshmpi.layout), when known

    @property
    def data(self) -> np.ndarray | None:
        if self.incoming is not None:
            raise HazardError(f"buffer {self.name!r} was used while pattern {self.incoming!r} "
                              f"was still delivering into it (before its wait)")
        return self._data

    @data.setter
    def data(self, value) -> None:
        if self.incoming is not None:
            raise HazardError(f"buffer {self.name!r} was replaced while pattern {self.incoming!r} "
                              f"was still delivering into it (before its wait)")
        self._data = value

    @property
    def tile_elements(self) -> int:
        return math.prod(self.tile_shape)

    @property
    def tile_bytes(self) -> int:
        """Bytes per core at the wafer's storage type (the profile's ``element_bytes``)."""
        return self.tile_elements * self.mesh.hardware.element_bytes

    @property
    def shape(self) -> tuple:
        return self.mesh.block_shape + self.tile_shape

    def swap_payload(self, other: "MeshArray") -> None:
        """Exchange tiles with ``other``, a buffer of the same shape: the two halves of a double
        buffer trade roles, as a core's program swaps two buffer addresses. Names and memory
        charges stay with their owners."""
        if other.tile_shape != self.tile_shape or other.dtype != self.dtype:
            raise ValueError(f"cannot swap {self.name} {self.tile_shape} with {other.name} {other.tile_shape}")
        self.data, other.data = other.data, self.data

    def free(self) -> None:
        """Release the buffer's memory on every core."""
        self.mesh.memory.release(self.name)
        self.data = None

    def __repr__(self) -> str:
        kind = "dry" if self.data is None else "numeric"
        return f"MeshArray({self.name!r}, tile={self.tile_shape}, {self.dtype}, {kind})"
