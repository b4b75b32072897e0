"""Hardware profiles: the chip's numbers as data (JSON), never as code (PAPER.md §1).

A profile file maps each parameter to ``{"value": ..., "source": ..., "guessed": bool}``.
``--hardware NAME|PATH`` picks one; ``--set key=value`` overrides single values.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields, replace
from importlib import resources
from pathlib import Path

from .errors import UsageError

BUILTIN = ("wse2", "wse3")
# Parameters that may be 0 (latencies and fixed costs); every other one must be positive.
_MAY_BE_ZERO = ("alpha_cycles_per_hop", "beta_cycles_per_relay", "router_queue_bytes", "vector_op_cycles",
                "scalar_op_cycles", "transfer_start_cycles")


@dataclass(frozen=True)
class Hardware:
    name: str
    mesh_rows: int
    mesh_cols: int
    sram_bytes_per_core: int
    clock_hz: float
    alpha_cycles_per_hop: float
    beta_cycles_per_relay: float
    link_bytes_per_cycle: float
    router_queue_bytes: float
    flops_per_cycle: float
    vector_op_cycles: float
    scalar_op_cycles: float
    transfer_start_cycles: float
    routes_per_core: int
    element_bytes: int
    description: str = ""
    sources: dict = field(default_factory=dict, compare=False, repr=False)
    guessed: tuple = field(default=(), compare=False, repr=False)

    def cycles_to_seconds(self, cycles: float) -> float:
        return float(cycles) / self.clock_hz

    def values(self) -> dict:
        """The numeric parameters, for reports and traces."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name not in ("sources", "guessed", "description")}

    def to_json(self) -> str:
        doc = {"name": self.name, "description": self.description}
        for key, value in self.values().items():
            if key == "name":
                continue
            doc[key] = {"value": value, "source": self.sources.get(key, ""),
                        "guessed": key in self.guessed}
        return json.dumps(doc, indent=2)

    def with_overrides(self, assignments) -> "Hardware":
        """Apply ``key=value`` strings (from ``--set``)."""
        changes, guessed = {}, set(self.guessed)
        numeric = {f.name: f.type for f in fields(self)}
        for text in assignments or ():
            key, sep, raw = text.partition("=")
            key = key.strip()
            if not sep or key not in self.values() or key == "name":
                known = ", ".join(k for k in self.values() if k != "name")
                raise UsageError(f"--set expects key=value with key one of: {known} (got {text!r})")
            try:
                value = float(raw)
            except ValueError:
                value = math.nan
            if not math.isfinite(value):
                raise UsageError(f"--set {key}: {raw!r} is not a number")
            if numeric[key] == "int":
                if value != int(value):
                    raise UsageError(f"--set {key}: needs a whole number, got {raw}")
                value = int(value)
            if value <= 0 and key not in _MAY_BE_ZERO:
                raise UsageError(f"--set {key}: must be positive, got {raw}")
            if value < 0:
                raise UsageError(f"--set {key}: must not be negative, got {raw}")
            changes[key] = value
            guessed.discard(key)
        if not changes:
            return self
        sources = dict(self.sources)
        for key in changes:
            sources[key] = "set on the command line"
        return replace(self, **changes, sources=sources, guessed=tuple(sorted(guessed)))


def _from_document(doc: dict, origin: str) -> Hardware:
    kwargs, sources, guessed = {}, {}, []
    for f in fields(Hardware):
        if f.name in ("sources", "guessed"):
            continue
        if f.name in ("name", "description"):
            kwargs[f.name] = str(doc.get(f.name, "" if f.name == "description" else origin))
            continue
        if f.name not in doc:
            raise UsageError(f"hardware profile {origin}: missing parameter {f.name!r}")
        entry = doc[f.name]
        value = entry["value"] if isinstance(entry, dict) else entry
        try:
            value = int(value) if f.type == "int" else float(value)
        except (TypeError, ValueError):
            raise UsageError(f"hardware profile {origin}: {f.name} is not a number") from None
        kwargs[f.name] = value
        if isinstance(entry, dict):
            sources[f.name] = entry.get("source", "")
            if entry.get("guessed"):
                guessed.append(f.name)
    return Hardware(**kwargs, sources=sources, guessed=tuple(guessed))


def load_hardware(spec: str | None = "wse2", overrides=None) -> Hardware:
    """Load a built-in profile by name or a user's JSON file by path."""
    spec = spec or "wse2"
    if spec in BUILTIN:
        text = resources.files("meshmpi").joinpath("profiles", f"{spec}.json").read_text()
        origin = spec
    else:
        path = Path(spec)
        if not path.is_file():
            raise UsageError(f"--hardware {spec}: not a built-in profile ({', '.join(BUILTIN)}) "
                             "and no such file")
        text, origin = path.read_text(), str(path)
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"hardware profile {origin}: invalid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(doc, dict):
        raise UsageError(f"hardware profile {origin}: expected a JSON object")
    return _from_document(doc, origin).with_overrides(overrides)
