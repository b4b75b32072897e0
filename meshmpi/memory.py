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
        # Resident bytes per core = the uniform buffers' sum (one number: most charges, made
        # and released in O(1)) + the per-core buffers' sum. The peak per core is kept up to
        # the last change of the per-core sum; since then, ``_uniform_peak`` is the most the
        # uniform sum reached.
        self._uniform = 0
        self._varying = np.zeros(shape, np.int64)
        self._varying_max = 0
        self._peak = np.zeros(shape, np.int64)
        self._uniform_peak = 0
        self.high_water = 0    # most bytes resident on any core of this block since the last mark
        self.warnings: list[str] = []
        self.bound = 0         # >= the bytes resident on the fullest core of the mesh, on every rank
        self.tape: list | None = None     # charges and releases recorded for meshmpi.steady

    @property
    def resident(self) -> np.ndarray:
        """Bytes resident now on each core of this block."""
        return self._varying + self._uniform

    @property
    def peak(self) -> np.ndarray:
        """The most bytes each core of this block has held."""
        self._fold_peak()
        return self._peak

    def _fold_peak(self) -> None:
        np.maximum(self._peak, self._varying + self._uniform_peak, out=self._peak)
        self._uniform_peak = self._uniform

    def _add(self, amount, sign: int, fold: bool = True) -> None:
        """Add (``sign`` +1) or take away (-1) one buffer's bytes from the resident sums (the
        peak kept up to now first, unless ``fold`` is off: undoing a refused charge)."""
        if np.ndim(amount) == 0:
            self._uniform += sign * int(amount)
            return
        if fold:
            self._fold_peak()
        self._varying += sign * amount
        self._varying_max = int(self._varying.max(initial=0))
        self._uniform_peak = self._uniform

    def charge(self, name: str, bytes_per_core) -> None:
        """Make ``name`` hold ``bytes_per_core`` (a scalar or a block-shaped array) on every core."""
        if self.tape is not None:
            self.tape.append(("charge", (name, np.asarray(bytes_per_core).tobytes()), None, np.array(bytes_per_core)))
        uniform = np.ndim(bytes_per_core) == 0
        new = np.int64(bytes_per_core) if uniform else \
            np.array(np.broadcast_to(np.asarray(bytes_per_core, np.int64), self._varying.shape))
        old = self.buffers.get(name)
        if old is not None:
            self._add(old, -1)
        self._add(new, +1)
        self.buffers[name] = new
        bound = self.bound
        if uniform and (old is None or np.ndim(old) == 0):
            self.bound += int(new) - (0 if old is None else int(old))
        else:
            self.bound = int(self.mesh.max_over_ranks(self.most_resident()))
        try:
            if self.bound > self.sram_bytes:
                self._check(name)
        except CoreMemoryError:     # refused: as it was before the charge
            self.bound = bound
            self._add(self.buffers.pop(name), -1, fold=False)
            if old is not None:
                self.buffers[name] = old
                self._add(old, +1, fold=False)
            raise
        self._uniform_peak = max(self._uniform_peak, self._uniform)
        self.high_water = max(self.high_water, self.most_resident())

    def most_resident(self) -> int:
        """Bytes resident now on this block's fullest core."""
        return self._varying_max + self._uniform if self._varying.size else 0

    def live(self) -> dict[str, int]:
        """Live buffers and their bytes on this block's fullest core for each (by name)."""
        return {name: int(b.max(initial=0)) for name, b in self.buffers.items()}

    def release(self, name: str) -> None:
        if self.tape is not None:
            self.tape.append(("release", (name,), None, None))
        old = self.buffers.pop(name, None)
        if old is not None:
            self._add(old, -1)
            if np.ndim(old) == 0:
                self.bound -= int(old)

    def _check(self, name: str) -> None:
        now = self.resident
        core = self.mesh.first_core_where(now > self.sram_bytes)
        if core is None:       # the bound was loose (a non-uniform buffer was released): tighten it
            self.bound = int(self.mesh.max_over_ranks(self.most_resident()))
            return
        here = self.mesh.owns(core)
        local = self.mesh.to_local(core) if here else None
        resident, need = self.mesh.value_at(core, lambda: (
            int(now[local]), int(np.broadcast_to(self.buffers[name], now.shape)[local])))
        message = (f"core ({core[0]}, {core[1]}) is out of memory: buffer {name!r} needs "
                   f"{need} B, resident {resident} B > SRAM {self.sram_bytes} B")
        if self.policy == "strict":
            raise CoreMemoryError(message)
        if not any(w.startswith(f"{name}:") for w in self.warnings):
            self.warnings.append(f"{name}: {message}")
