"""Defective cores and remapping: the logical mesh the kernels see, laid over a physical wafer
with dead cores (PAPER.md §9: small cores, so that a defect takes out little; redundant wires
bypass a dead core).

The scheme (row shift toward a shared profile with spare columns, row retirement with spare
rows):

- The physical wafer is ``rows + spare_rows`` by ``cols + spare_cols`` cores; the logical mesh
  is ``rows x cols``, so kernels and layouts do not change. A defect-free wafer maps logical
  core (r, c) to physical core (r, c) and leaves the spares idle.
- Row shift: each row places its logical cores left to right on healthy cores, logical
  column c on the first healthy core at or after both the core right of column c-1 and
  ``c + T(c)``, the shared shift profile ``T(c) = floor(slope * c)``, ``slope`` twice the
  share of dead cores in the logical rectangle (0 without defects). A dead core is bypassed by
  a redundant link that runs past the dead tile, so the logical x-neighbours on either side of
  it are 2 physical hops apart (k + 1 past k skipped cores); a row that a dead core pushed
  ahead of the profile catches up with it where the profile steps (its slack), so rows stay
  aligned and their shifts differ only by local clusters of dead cores. Where the profile
  steps, a healthy core is left idle and bypassed the same way.
- Row retirement: a physical row that runs out of columns is retired whole and the next row
  takes its place (the spare rows absorb it); y-neighbours across a retired row are 2 rows
  apart.
- A y-link joins (r, c) and (r+1, c), whose rows may have shifted differently. The scheme
  assumes that every router has redundant links to its diagonal neighbours (an assumption of
  this model: the public descriptions say only that redundant wires bypass a dead core), so a
  row offset by one column is one hop away (a diagonal link); the y-link costs ``max(rows apart, |column offset|)`` physical hops
  (diagonal steps first, the rest straight).
- Too many dead cores for the spares (fewer than ``rows`` physical rows that fit) is an error.

What the fabric pays (:mod:`meshmpi.fabric`, :mod:`meshmpi.worms`): every logical link has
its own physical path of ``k`` hops (no two logical links share a physical link), crossed
cut-through: ``alpha`` per physical hop, and the path's links are occupied as one link (a
later message enters the path when the earlier one's payload has left its first link; behind
it the path is always free, since every message crossing one of its links crosses them all).
Counters ``hops`` and the longest hop count physical hops; a blocked path holds ``k`` hops of
payload (:func:`meshmpi.costs.path_capacity`). Routes: a bypass link is a wire with repeaters
past the dead tile (or past the idle cores of a retired row or of a shift), not a route on a
router, so routes stay on the logical cores as on a perfect wafer (the dead tile's router is
off; no idle router is configured). A wafer whose logical links are all 1 hop (no defect, or
defects only among the spares) runs exactly as a perfect one: the fabric does no new work.

Defects come from a file (``--defects FILE``, JSON
``{"rows": PR, "cols": PC, "dead": [[row, col], ...]}``: the physical wafer and its dead cores,
the logical mesh on its top-left, the rest spares) or from a rate (``--defects RATE``: every
physical core is dead with that probability, drawn from ``--defect-seed``; the spares are
provisioned for the profile's slack and three standard deviations of a line's dead cores: for
n logical rows (or columns), the fewest spares s with ``s >= 2 lam + 3 sqrt(lam)``,
``lam = rate (n + s)``).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from .errors import UsageError

MAX_RATE = 0.25


class Remap:
    """The logical ``rows x cols`` mesh on a physical wafer whose dead cores are ``dead``
    (boolean [physical rows, physical cols]); see the module docstring."""

    def __init__(self, dead: np.ndarray, rows: int, cols: int, source: str = ""):
        dead = np.asarray(dead, bool)
        phys_rows, phys_cols = dead.shape
        if phys_rows < rows or phys_cols < cols:
            raise UsageError(f"defect map: a {phys_rows}x{phys_cols} physical wafer cannot hold the "
                             f"{rows}x{cols} mesh")
        self.dead, self.rows, self.cols, self.source = dead, rows, cols, source
        self.slope = 2 * float(dead[:rows, :cols].mean())
        columns = place_rows(dead, cols, self.slope)
        usable = np.flatnonzero(columns[:, -1] < phys_cols)
        if usable.size < rows:
            raise UsageError(f"too many defects for the spares: {usable.size} of the {phys_rows} physical rows "
                             f"fit {cols} cores, the {rows}x{cols} mesh needs {rows} "
                             f"({int(dead.sum())} dead cores, {phys_rows - rows} spare rows, "
                             f"{phys_cols - cols} spare columns)")
        self.row_of = usable[:rows]                                   # physical row of each logical row
        self.col_of = columns[self.row_of]                            # physical column of each logical core
        self.link_hops = {
            "x": np.diff(self.col_of, axis=1),                                            # [rows, cols-1]
            "y": np.maximum(np.diff(self.row_of)[:, None], np.abs(np.diff(self.col_of, axis=0))),  # [rows-1, cols]
        }

    @property
    def stretched(self) -> bool:
        """Whether some logical link is longer than one physical hop."""
        return any(bool((h > 1).any()) for h in self.link_hops.values())

    def stats(self) -> dict:
        """The map's statistics for a report: dead cores, spares, the share of logical links
        longer than one hop and the longest one."""
        hops = np.concatenate([h.ravel() for h in self.link_hops.values()])
        return {"physical": f"{self.dead.shape[0]}x{self.dead.shape[1]}", "source": self.source,
                "dead_cores": int(self.dead.sum()),
                "spare_rows": self.dead.shape[0] - self.rows, "spare_cols": self.dead.shape[1] - self.cols,
                "logical_links": int(hops.size),
                "stretched_share": float((hops > 1).mean()) if hops.size else 0.0,
                "worst_stretch": int(hops.max(initial=1))}

    def line_hops(self, axis: str) -> np.ndarray:
        """Physical hops of the link between positions p and p+1 along ``axis`` on every line,
        positions first: [positions - 1, lines]."""
        return self.link_hops["x"].T if axis == "x" else self.link_hops["y"]

    def cumulative(self, axis: str, lines: slice = slice(None)) -> np.ndarray:
        """[positions, lines]: physical hops from position 0 to each position, on ``lines``;
        a message between positions s and d crosses ``|cum[d] - cum[s]|`` physical hops."""
        hops = self.line_hops(axis)[:, lines]
        return np.concatenate([np.zeros((1, hops.shape[1]), np.int64), np.cumsum(hops, axis=0)])

    def block_link_hops(self, axis: str, start: int, stop: int, lines: slice) -> dict:
        """Physical hops of the directed links leaving positions ``start..stop-1`` on ``lines``,
        stored like the fabric's link free times: ``{+1: [p, line] link p -> p+1, -1: ... p -> p-1}``
        (1 where there is no link: the mesh's edges, never crossed)."""
        hops = self.line_hops(axis)[:, lines]
        padded = np.concatenate([np.ones((1, hops.shape[1]), np.int64), hops,
                                 np.ones((1, hops.shape[1]), np.int64)])      # row i: link i-1 <-> i
        return {+1: padded[start + 1:stop + 1].astype(np.float64), -1: padded[start:stop].astype(np.float64)}


def place_rows(dead: np.ndarray, cols: int, slope: float) -> np.ndarray:
    """Per physical row, the physical column of each of ``cols`` logical columns (see the
    module docstring; the number of physical columns where the row runs out of them). One
    step per logical column, vectorised over the rows."""
    phys_rows, phys_cols = dead.shape
    healthy_at = np.where(dead, phys_cols, np.arange(phys_cols))
    next_healthy = np.minimum.accumulate(healthy_at[:, ::-1], axis=1)[:, ::-1]   # first healthy >= x
    next_healthy = np.concatenate([next_healthy, np.full((phys_rows, 1), phys_cols)], axis=1)
    profile = np.arange(cols) + np.floor(slope * np.arange(cols)).astype(np.int64)
    columns = np.empty((phys_rows, cols), np.int64)
    every, previous = np.arange(phys_rows), np.full(phys_rows, -1)
    for c in range(cols):
        previous = columns[:, c] = next_healthy[every, np.minimum(np.maximum(previous + 1, profile[c]), phys_cols)]
    return columns


def message_spans(src, dst, multicast: bool, relay: bool):
    """The messages of a line pattern as (sender, lo, hi): each crosses the links between
    positions lo and hi, counted as the sender's hops (the fabric's closed forms)."""
    src, dst = np.asarray(src, np.int64), np.asarray(dst, np.int64)
    if not multicast:
        return src, np.minimum(src, dst), np.maximum(src, dst)
    senders, los, his = [], [], []
    for s in np.unique(src):
        targets = dst[src == s]
        lo, hi = min(int(targets.min()), int(s)), max(int(targets.max()), int(s))
        if relay:        # a chain of 1-hop messages: leftwards from lo+1..s, rightwards from s..hi-1
            left, right = np.arange(lo + 1, s + 1), np.arange(s, hi)
            senders += [left, right]
            los += [left - 1, right]
            his += [left, right + 1]
        else:
            senders.append(np.array([s]))
            los.append(np.array([lo]))
            his.append(np.array([hi]))
    return np.concatenate(senders), np.concatenate(los), np.concatenate(his)


class PatternPaths:
    """A line pattern's physical paths on a remapped mesh, planned once with the pattern:
    ``delivery_hops`` [deliveries, block lines], ``extra_hops`` [block positions, block lines]
    (physical hops beyond the logical ones sent by each core), ``max_hops`` over the whole mesh.
    ``lines`` are the block's lines, ``start..stop-1`` its positions."""

    def __init__(self, remap: Remap, pattern, start: int, stop: int, lines: slice):
        axis = pattern.axis
        whole = remap.cumulative(axis)
        cum = whole[:, lines]
        self.delivery_hops = np.abs(cum[pattern.dst] - cum[pattern.src])
        self.max_hops = int(np.abs(whole[pattern.dst] - whole[pattern.src]).max(initial=0))
        sender, lo, hi = message_spans(pattern.src, pattern.dst, pattern.multicast, pattern.relay)
        extra = np.zeros(cum.shape, np.int64)
        np.add.at(extra, sender, cum[hi] - cum[lo] - (hi - lo)[:, None])
        self.extra_hops = extra[start:stop]


# ---------------------------------------------------------------------------- input
def spares_for(rate: float, n: int) -> int:
    """Spare rows (or columns) provisioned for ``n`` logical ones at a defect rate: the fewest
    ``s`` with ``s >= 2 lam + 3 sqrt(lam)``, ``lam = rate (n + s)`` (the shift profile's slack,
    twice the mean dead cores of a line of ``n + s``, and three standard deviations)."""
    s = 0
    while s < 2 * rate * (n + s) + 3 * math.sqrt(rate * (n + s)):
        s += 1
    return s


def parse_spec(text: str):
    """``--defects FILE|RATE``: a rate in [0, MAX_RATE] as a float, else a path that must exist."""
    try:
        rate = float(text)
    except ValueError:
        path = Path(text)
        if not path.is_file():
            raise UsageError(f"--defects expects a rate in [0, {MAX_RATE}] or a defect-map file, "
                             f"got {text!r} (no such file)") from None
        return path
    if not (0.0 <= rate <= MAX_RATE):
        raise UsageError(f"--defects rate {text} is out of range: give a rate in [0, {MAX_RATE}]")
    return rate


def read_map(path: Path) -> np.ndarray:
    """The dead cores of a defect-map file (see the module docstring) as a boolean array."""
    try:
        doc = json.loads(Path(path).read_text())
        phys_rows, phys_cols, dead = int(doc["rows"]), int(doc["cols"]), np.asarray(doc["dead"], np.int64)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"--defects {path}: not a defect map ({type(exc).__name__}: {exc}); expected JSON "
                         '{"rows": R, "cols": C, "dead": [[row, col], ...]}') from None
    dead = dead.reshape(-1, 2) if dead.size else np.zeros((0, 2), np.int64)
    if phys_rows < 1 or phys_cols < 1:
        raise UsageError(f"--defects {path}: the wafer needs positive rows and cols")
    outside = (dead < 0).any(axis=1) | (dead[:, 0] >= phys_rows) | (dead[:, 1] >= phys_cols)
    if outside.any():
        raise UsageError(f"--defects {path}: dead core {tuple(int(v) for v in dead[outside][0])} is outside "
                         f"the {phys_rows}x{phys_cols} wafer")
    mask = np.zeros((phys_rows, phys_cols), bool)
    mask[dead[:, 0], dead[:, 1]] = True
    return mask


def remap_for(spec, seed: int, rows: int, cols: int) -> Remap | None:
    """The map of a ``rows x cols`` mesh for a parsed ``--defects`` value (None: no defects);
    the same on every rank (the draw depends on the seed and the mesh alone)."""
    if spec is None:
        return None
    if isinstance(spec, Path):
        return Remap(read_map(spec), rows, cols, str(spec))
    phys = (rows + spares_for(spec, rows), cols + spares_for(spec, cols))
    dead = np.random.default_rng(seed).random(phys) < spec
    return Remap(dead, rows, cols, f"rate {spec:g}, seed {seed}")
