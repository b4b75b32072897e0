"""Checking a numeric run against an independent reference: a wrong or non-finite number fails.

Products are held to the classical forward error bound of a dot product of length ``k``
evaluated in floating point, ``|fl(x.y) - x.y| <= gamma_k |x|.|y|`` with
``gamma_k = k u / (1 - k u)`` and ``u`` the unit roundoff of the working type (Higham,
*Accuracy and Stability of Numerical Algorithms*, §3.1). It holds for any summation order,
so the mesh's order of accumulation cannot fail it and a wrong tile cannot pass it.
"""
from __future__ import annotations

import numpy as np

from .errors import CheckError


def gamma(k: int, dtype) -> float:
    """``gamma_k`` for ``k`` multiply-adds in ``dtype`` (unit roundoff ``eps / 2``)."""
    u = float(np.finfo(np.dtype(dtype)).eps) / 2
    ku = max(int(k), 1) * u
    if ku >= 1:
        raise ValueError(f"a dot product of length {k} has no error bound in {np.dtype(dtype)}")
    return ku / (1 - ku)


def require_finite(what: str, array: np.ndarray) -> None:
    """Raise :class:`CheckError` when ``array`` holds NaN or infinity."""
    bad = ~np.isfinite(array)
    if bad.any():
        where = np.unravel_index(int(np.flatnonzero(bad)[0]), array.shape)
        raise CheckError(f"check failed: {what} has {int(bad.sum())} non-finite values "
                         f"(first {array[where]} at index {tuple(int(i) for i in where)})")


def check_product(what: str, result: np.ndarray, a: np.ndarray, b: np.ndarray, dtype) -> float:
    """Compare ``result`` with ``a @ b`` (in float64) element by element against the forward
    error bound of the product in ``dtype``; returns the max absolute error."""
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    require_finite(what, result)
    error = np.abs(np.asarray(result, np.float64) - a64 @ b64)
    bound = gamma(a64.shape[-1], dtype) * (np.abs(a64) @ np.abs(b64))
    # the float64 reference itself carries its own rounding: allow gamma_k in float64 of |a||b|
    bound += gamma(a64.shape[-1], np.float64) * (np.abs(a64) @ np.abs(b64)) + np.finfo(np.float64).tiny
    over = error > bound
    if over.any():
        where = np.unravel_index(int(np.argmax(error - bound)), error.shape)
        raise CheckError(f"check failed: {what} differs from numpy at {tuple(int(i) for i in where)} by "
                         f"{error[where]:.3g} (bound {bound[where]:.3g}; max |error| {error.max():.3g} "
                         f"in {int(over.sum())} elements)")
    return float(error.max(initial=0.0))
