"""End-to-end time of one request (PAPER.md §7): prefill, the re-layout, then one decode step
per new token after the first, each step at a context one token longer than the last.

A numeric run simulates every step. A dry run of a long output samples the context: it
simulates the steps at a few positions spread evenly over the output (the first and the last
included), and integrates the cost of the others by linear interpolation between neighbouring
samples. A decode step's cost grows with the fullest row's token count, which grows by one
every ``rows`` tokens, so it is a staircase close to a straight line between samples; the
error of the integration is measured against a run of every step in the tests.
"""
from __future__ import annotations

import numpy as np

from meshmpi.errors import UsageError


def check_samples(samples: int) -> None:
    """``--decode-samples``: at least the first and the last step."""
    if samples < 2:
        raise UsageError(f"--decode-samples must be at least 2 (the first and the last step), got {samples}")


def sample_positions(first: int, last: int, samples: int) -> list[int]:
    """Positions of the steps to simulate among ``first..last`` (inclusive): all of them when
    there are at most ``samples``, else ``samples`` evenly spread, both ends included."""
    if last < first:
        return []
    count = last - first + 1
    if count <= samples:
        return list(range(first, last + 1))
    return sorted({int(round(p)) for p in np.linspace(first, last, samples)})


def integrate(positions: list[int], cycles: list[float], first: int, last: int) -> float:
    """Total cycles of every step ``first..last`` from the steps simulated at ``positions``
    (linear between neighbouring samples; exact when every position was simulated)."""
    if last < first:
        return 0.0
    every = np.arange(first, last + 1)
    return float(np.interp(every, positions, cycles).sum())


def summary(positions: list[int], first: int, last: int) -> dict:
    """How the decode time was obtained, for the report."""
    steps = max(last - first + 1, 0)
    sampled = len(positions) < steps
    return {"steps": steps, "simulated_steps": len(positions),
            "method": "sampled context, linear between samples" if sampled else "every step simulated",
            "positions": positions if sampled else None}
