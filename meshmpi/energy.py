"""Energy: joules from a run's counted events and the profile's energy constants (PAPER.md §9).

Four parts, each a closed form over counters the mesh keeps anyway:

- compute: FLOPs x ``pj_per_flop_fp16`` (``element_bytes`` <= 2) or ``pj_per_flop_fp32``;
- SRAM: every FLOP is taken as half a multiply-add that reads two operands and reads and
  writes its accumulator, so it reads ``1.5 * element_bytes`` and writes ``0.5 * element_bytes``;
  a transfer reads its bytes at the sender and writes them at every receiver
  (``bytes_sent``, ``bytes_recv``); charged ``pj_per_sram_byte_read`` / ``_written``;
- fabric: bytes x links crossed (``byte_hops``) x ``pj_per_byte_hop``;
- static: ``static_watts_per_core`` x cores x modeled seconds.

Software relays and host-plane I/O are not charged. The constants and their calibration are
in the profiles and results/README.md ("Energy").
"""
from __future__ import annotations

import numpy as np

from .errors import UsageError
from .hardware import ENERGY_KEYS

PARTS = ("compute", "sram", "fabric", "static")
EVENTS = ("flops", "bytes_sent", "bytes_recv", "byte_hops")
PICO = 1e-12


def require(hw) -> None:
    """A UsageError unless ``hw`` states every energy constant."""
    if not hw.has_energy:
        missing = [key for key in ENERGY_KEYS if getattr(hw, key) is None]
        raise UsageError(f"hardware profile {hw.name} states no {', '.join(missing)}: energy needs them")


def pj_per_flop(hw) -> float:
    """The arithmetic's energy at the profile's storage type (fp16 up to 2 bytes, else fp32)."""
    return hw.pj_per_flop_fp16 if hw.element_bytes <= 2 else hw.pj_per_flop_fp32


def sram_bytes(hw, flops, bytes_sent, bytes_recv):
    """(bytes read, bytes written) of SRAM for the counted events (see the module docstring)."""
    flops = np.asarray(flops, np.float64)
    return (1.5 * hw.element_bytes * flops + np.asarray(bytes_sent, np.float64),
            0.5 * hw.element_bytes * flops + np.asarray(bytes_recv, np.float64))


def joules(hw, events: dict, core_seconds) -> dict:
    """Joules by part (plus ``total``) of ``events`` (counter name -> count, scalars or per-core
    arrays) over ``core_seconds`` core-seconds of static power."""
    require(hw)
    read, written = sram_bytes(hw, events["flops"], events["bytes_sent"], events["bytes_recv"])
    parts = {
        "compute": np.asarray(events["flops"], np.float64) * pj_per_flop(hw) * PICO,
        "sram": (read * hw.pj_per_sram_byte_read + written * hw.pj_per_sram_byte_written) * PICO,
        "fabric": np.asarray(events["byte_hops"], np.float64) * hw.pj_per_byte_hop * PICO,
        "static": np.asarray(core_seconds, np.float64) * hw.static_watts_per_core,
    }
    parts["total"] = sum(parts.values())
    return {name: value if np.ndim(value) else float(value) for name, value in parts.items()}


def mesh_events(mesh) -> dict:
    """The whole mesh's counted events so far (every rank gets the same sums)."""
    sums = mesh.sum_over_ranks(np.array([mesh.totals[name] for name in EVENTS], np.int64))
    return dict(zip(EVENTS, (int(v) for v in sums)))


def combine(*terms) -> dict:
    """``sum(factor * events)`` over ``(factor, events)`` pairs (e.g. ``(1, after), (-1, before)``)."""
    return {name: sum(factor * events[name] for factor, events in terms) for name in EVENTS}


def per_core(mesh, seconds: float) -> np.ndarray:
    """This block's joules per core: its own events, and static power over ``seconds``."""
    counters = mesh.counters
    return joules(mesh.hardware, {name: counters[name] for name in EVENTS}, seconds)["total"]


def summary(split: dict, seconds: float) -> dict:
    """The report's fields: ``energy_joules``, the split and the average power."""
    return {"energy_joules": split["total"],
            "energy_split_joules": {name: split[name] for name in PARTS},
            "average_watts": split["total"] / seconds if seconds else None}


def run_summary(mesh) -> dict:
    """:func:`summary` of everything ``mesh`` counted, static power on all its cores over its
    modeled time; empty fields when the profile has no energy constants."""
    if not mesh.hardware.has_energy:
        return {"energy_joules": None, "energy_split_joules": None, "average_watts": None}
    seconds = mesh.hardware.cycles_to_seconds(mesh.modeled_cycles())
    return summary(joules(mesh.hardware, mesh_events(mesh), mesh.rows * mesh.cols * seconds), seconds)


def describe(report: dict) -> str:
    """One human-readable line of a report's energy fields ('' without them)."""
    total = report.get("energy_joules")
    if total is None:
        return ""
    split = ", ".join(f"{name} {value / total:.0%}" if total else f"{name} 0"
                      for name, value in report["energy_split_joules"].items())
    watts = report.get("average_watts")
    power = f", average {watts:.4g} W" if watts is not None else ""
    return f"energy {total:.4g} J ({split}){power}"
