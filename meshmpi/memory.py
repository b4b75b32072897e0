"""Per-core memory accounting (PLMR: M): named resident buffers against the profile's SRAM."""
from __future__ import annotations

import numpy as np

from .errors import CoreMemoryError


class MemoryLedger:
    """Resident bytes per core of one rank's block, with the peak, by buffer name.

    Every charge is agreed across ranks, so an over-full core anywhere raises the same
    :class:`CoreMemoryError` on every rank (``policy="strict"``) or is recorded once
    (``policy="warn"``). Every rank keeps the same upper bound of the fullest core of the whole
    mesh: a uniform (scalar) charge or release moves every core, hence the bound, by the same
    amount, so a charge that leaves it within SRAM needs no agreement between ranks.
    """

    def __init__(self, mesh, sram_bytes: int, policy: str = "strict"):
        if policy not in ("strict", "warn"):
            raise ValueError(f"memory policy must be strict or warn, not {policy!r}")
        self.mesh = mesh
        self.sram_bytes = int(sram_bytes)
        self.policy = policy
        shape = mesh.block_shape
        self.buffers: dict[str, np.ndarray] = {}
        self.resident = np.zeros(shape, np.int64)
        self.peak = np.zeros(shape, np.int64)
        self.high_water = 0    # most bytes resident on any core of this block since the last mark
        self.warnings: list[str] = []
        self.bound = 0         # >= the bytes resident on the fullest core of the mesh, on every rank

    def charge(self, name: str, bytes_per_core) -> None:
        """Make ``name`` hold ``bytes_per_core`` (a scalar or a block-shaped array) on every core."""
        uniform = np.ndim(bytes_per_core) == 0
        new = np.int64(bytes_per_core) if uniform else \
            np.array(np.broadcast_to(np.asarray(bytes_per_core, np.int64), self.resident.shape))
        old = self.buffers.get(name)
        self.resident += new if old is None else new - old
        self.buffers[name] = new
        bound = self.bound
        if uniform and (old is None or np.ndim(old) == 0):
            self.bound += int(new) - (0 if old is None else int(old))
        else:
            self.bound = int(self.mesh.max_over_ranks(self.most_resident()))
        try:
            if self.bound > self.sram_bytes:
                self._check(name)
        except CoreMemoryError:
            self.bound = bound
            if old is not None:  # a refused re-charge leaves the buffer's old charge in place
                self.buffers[name] = old
                self.resident += old
            raise
        np.maximum(self.peak, self.resident, out=self.peak)
        self.high_water = max(self.high_water, self.most_resident())

    def most_resident(self) -> int:
        """Bytes resident now on this block's fullest core."""
        return int(self.resident.max(initial=0))

    def live(self) -> dict[str, int]:
        """Live buffers and their bytes on this block's fullest core for each (by name)."""
        return {name: int(b.max(initial=0)) for name, b in self.buffers.items()}

    def release(self, name: str) -> None:
        old = self.buffers.pop(name, None)
        if old is not None:
            self.resident -= old
            if np.ndim(old) == 0:
                self.bound -= int(old)

    def _check(self, name: str) -> None:
        over = self.resident > self.sram_bytes
        core = self.mesh.first_core_where(over)
        if core is None:       # the bound was loose (a non-uniform buffer was released): tighten it
            self.bound = int(self.mesh.max_over_ranks(self.most_resident()))
            return
        here = self.mesh.owns(core)
        local = self.mesh.to_local(core) if here else None
        resident, need = self.mesh.value_at(core, lambda: (
            int(self.resident[local]), int(np.broadcast_to(self.buffers[name], self.resident.shape)[local])))
        message = (f"core ({core[0]}, {core[1]}) is out of memory: buffer {name!r} needs "
                   f"{need} B, resident {resident} B > SRAM {self.sram_bytes} B")
        if self.policy == "strict":
            self.release(name)
            raise CoreMemoryError(message)
        if not any(w.startswith(f"{name}:") for w in self.warnings):
            self.warnings.append(f"{name}: {message}")
