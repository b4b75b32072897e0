"""Progress of a long run on rank 0's stderr, so a user sees that a job is alive and how far it got.

On a terminal a tqdm bar; elsewhere (``mpiexec`` pipes, batch logs) one plain line when a stage
starts and then at most one every ``every`` seconds. Other ranks, ``--quiet`` and ``--json``
runs that asked for quiet print nothing; stdout is never touched.
"""
from __future__ import annotations

import sys
import time

from mpi4py import MPI


class Progress:
    """``update(n)`` advances ``total`` steps of a stage named ``desc``; ``close()`` ends it."""

    def __init__(self, total: int, desc: str, unit: str, enabled: bool = True, bar: bool | None = None,
                 every: float = 10.0, stream=None):
        self.total, self.desc, self.unit, self.every = int(total), desc, unit, every
        self.stream = stream or sys.stderr
        self.enabled = enabled and MPI.COMM_WORLD.Get_rank() == 0
        self.done, self.started, self.shown = 0, time.perf_counter(), -1
        self.last_line = self.started
        self.bar = None
        if self.enabled and (self.stream.isatty() if bar is None else bar):
            from tqdm import tqdm
            self.bar = tqdm(total=self.total, desc=desc, unit=unit, leave=False, file=self.stream,
                            dynamic_ncols=True)
        elif self.enabled:
            self._line()

    def update(self, n: int = 1) -> None:
        if not self.enabled:
            return
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif time.perf_counter() - self.last_line >= self.every:
            self._line()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled and self.done != self.shown:
            self._line()
        self.enabled = False

    def _line(self) -> None:
        self.last_line, self.shown = time.perf_counter(), self.done
        elapsed = self.last_line - self.started
        print(f"{self.desc}: {self.done}/{self.total} {self.unit} ({elapsed:.0f} s)", file=self.stream, flush=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def stage(message: str, enabled: bool = True, stream=None) -> None:
    """One line for a stage without steps (loading, set-up), on rank 0's stderr."""
    if enabled and MPI.COMM_WORLD.Get_rank() == 0:
        print(message, file=stream or sys.stderr, flush=True)
