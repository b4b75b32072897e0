"""Per-router route accounting (PLMR: R).

A transfer pattern declares, for each position along its axis, how many routes it needs on
that router (source, pass-through and destination of each message). Patterns that share a
``group`` are steps of one schedule that reuse the same colours: a group costs, on each
router, the most any of its patterns needs. A core's usage is the sum over live groups of
its row's (y) and its column's (x) counts.
"""
from __future__ import annotations

import numpy as np

from .errors import RoutingError


class RouteTable:
    def __init__(self, mesh, limit: int, policy: str = "strict"):
        if policy not in ("strict", "warn"):
            raise ValueError(f"route policy must be strict or warn, not {policy!r}")
        self.mesh = mesh
        self.limit = int(limit)
        self.policy = policy
        self.groups: dict[tuple, dict[int, np.ndarray]] = {}
        self.usage = {"y": np.zeros(mesh.rows, np.int64), "x": np.zeros(mesh.cols, np.int64)}
        self.peak = np.zeros(mesh.block_shape, np.int64)
        self.warnings: list[str] = []

    def declare(self, axis: str, group: str, owner: int, counts: np.ndarray) -> None:
        members = self.groups.setdefault((axis, group), {})
        members[owner] = np.asarray(counts, np.int64)
        self._recount()
        try:
            self._check(group)
        except RoutingError:
            self.release(axis, group, owner)
            raise
        m = self.mesh  # only routes actually configured count towards the peak
        block = (self.usage["y"][m.row_start:m.row_stop, None]
                 + self.usage["x"][None, m.col_start:m.col_stop])
        np.maximum(self.peak, block, out=self.peak)

    def release(self, axis: str, group: str, owner: int) -> None:
        members = self.groups.get((axis, group))
        if members is not None and members.pop(owner, None) is not None:
            if not members:
                del self.groups[(axis, group)]
            self._recount()

    def _recount(self) -> None:
        for axis in ("x", "y"):
            self.usage[axis][:] = 0
        for (axis, _), members in self.groups.items():
            self.usage[axis] += np.max(np.stack(list(members.values())), axis=0)

    def max_usage(self) -> int:
        return int(self.usage["y"].max() + self.usage["x"].max())

    def _check(self, group: str) -> None:
        # usage is known to every rank for the whole mesh: the check needs no messages.
        if self.max_usage() <= self.limit:
            return
        row, col = int(self.usage["y"].argmax()), int(self.usage["x"].argmax())
        message = (f"router of core ({row}, {col}) needs {self.max_usage()} routes "
                   f"> limit {self.limit} (after declaring {group!r})")
        if self.policy == "strict":
            raise RoutingError(message)
        if not any(w.startswith(f"{group}:") for w in self.warnings):
            self.warnings.append(f"{group}: {message}")
