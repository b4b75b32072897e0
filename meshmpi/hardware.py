"""Hardware profiles: the chip's numbers as data (JSON), never as code (PAPER.md §1).

A profile file maps each parameter to ``{"value": ..., "source": ..., "guessed": bool}``.
``--hardware NAME|PATH`` picks one; ``--set key=value`` overrides single values.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field, fields, replace
from importlib import resources
from pathlib import Path

from .errors import UsageError

BUILTIN = ("wse2", "wse3")
BINARY_SUFFIX = {"K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30}


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
    # energy constants (PAPER.md §9); None when a profile states none (older files and traces)
    pj_per_flop_fp16: float | None = None
    pj_per_flop_fp32: float | None = None
    pj_per_sram_byte_read: float | None = None
    pj_per_sram_byte_written: float | None = None
    pj_per_byte_hop: float | None = None
    static_watts_per_core: float | None = None
    description: str = ""
    sources: dict = field(default_factory=dict, compare=False, repr=False)
    guessed: tuple = field(default=(), compare=False, repr=False)

    def cycles_to_seconds(self, cycles: float) -> float:
        return float(cycles) / self.clock_hz

    @property
    def has_energy(self) -> bool:
        """The profile states every energy constant (:data:`ENERGY_KEYS`)."""
        return all(getattr(self, key) is not None for key in ENERGY_KEYS)

    def values(self) -> dict:
        """The numeric parameters, for reports and traces."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name not in ("sources", "guessed", "description")}

    def to_json(self) -> str:
        doc = {"name": self.name, "description": self.description}
        for key, value in self.values().items():
            if key == "name" or value is None:
                continue
            doc[key] = {"value": value, "source": self.sources.get(key, ""),
                        "guessed": key in self.guessed}
        return json.dumps(doc, indent=2)

    def with_overrides(self, assignments) -> "Hardware":
        """Apply ``key=value`` strings (from ``--set``), each checked against :data:`SCHEMA`."""
        changes, guessed = {}, set(self.guessed)
        for text in assignments or ():
            key, sep, raw = text.partition("=")
            key = key.strip()
            if not sep or key not in SCHEMA:
                raise UsageError(f"--set expects key=value with key one of: {', '.join(SCHEMA)} (got {text!r})")
            changes[key] = SCHEMA[key].parse_text(raw.strip(), f"--set {key}")
            guessed.discard(key)
        if not changes:
            return self
        sources = dict(self.sources)
        for key in changes:
            sources[key] = "set on the command line"
        return replace(self, **changes, sources=sources, guessed=tuple(sorted(guessed)))


@dataclass(frozen=True)
class Parameter:
    """What one profile parameter may hold: a whole number or a real number, in ``unit``,
    at least ``low`` (above it when ``low_open``) and at most ``high``."""

    kind: type            # int or float
    unit: str
    low: float
    low_open: bool
    high: float
    optional: bool = False   # a profile may leave it out (the energy constants)

    def describe(self) -> str:
        what = "a whole number" if self.kind is int else "a finite number"
        bound = f"above {_shown(self.low)}" if self.low_open else f"at least {_shown(self.low)}"
        return f"{what} of {self.unit}, {bound} and at most {_shown(self.high)}"

    def check(self, value, where: str):
        """``value`` (an int or float already) in range, as ``kind``; else a UsageError."""
        if not math.isfinite(value):
            raise UsageError(f"{where}: {value} is not a number; expected {self.describe()}")
        if value <= self.low if self.low_open else value < self.low:
            problem = ("must be positive" if self.low_open else "must not be negative") if self.low == 0 \
                else f"must be at least {_shown(self.low)}"
            raise UsageError(f"{where}: {problem}, got {_shown(value)}; expected {self.describe()}")
        if value > self.high:
            raise UsageError(f"{where}: {_shown(value)} is too large; expected {self.describe()}")
        return self.kind(value)

    def parse_json(self, value, where: str):
        """A value from a JSON profile: a JSON number (an integer for whole-number fields)."""
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            shown = json.dumps(value) if not isinstance(value, dict) else "an object"
            raise UsageError(f"{where}: {shown} is not a number; expected {self.describe()}")
        if self.kind is int and not isinstance(value, int):
            raise UsageError(f"{where}: needs a whole number, got {value!r}; expected {self.describe()}")
        return self.check(value, where)

    def parse_text(self, raw: str, where: str):
        """A value written on the command line (whole-number fields take digits only, with an
        optional binary suffix: ``48K`` is 49152, ``1M`` 1048576, ``1G`` 2**30)."""
        if self.kind is int:
            suffixed = re.fullmatch(r"([+-]?[0-9]+)([KMG])", raw, re.IGNORECASE)
            if suffixed:
                return self.check(int(suffixed[1]) * BINARY_SUFFIX[suffixed[2].upper()], where)
            if not re.fullmatch(r"[+-]?[0-9]+", raw):
                try:
                    float(raw)
                except ValueError:
                    raise UsageError(f"{where}: {raw!r} is not a number; expected {self.describe()}") from None
                raise UsageError(f"{where}: needs a whole number written in digits, got {raw!r}; "
                                 f"expected {self.describe()}")
            return self.check(int(raw), where)
        try:
            value = float(raw)
        except ValueError:
            raise UsageError(f"{where}: {raw!r} is not a number; expected {self.describe()}") from None
        if not math.isfinite(value):
            raise UsageError(f"{where}: {raw!r} is not a finite number; expected {self.describe()}")
        return self.check(value, where)


def _shown(value) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"


# Every numeric parameter of a profile: its type, unit and range. The upper bounds only catch
# typos (a chip far beyond any wafer) and keep per-core counts inside 64-bit arithmetic.
SCHEMA = {
    "mesh_rows": Parameter(int, "cores", 1, False, 2 ** 20),
    "mesh_cols": Parameter(int, "cores", 1, False, 2 ** 20),
    "sram_bytes_per_core": Parameter(int, "bytes", 0, True, 2 ** 40),
    "clock_hz": Parameter(float, "Hz", 0, True, 1e15),
    "alpha_cycles_per_hop": Parameter(float, "cycles", 0, False, 1e9),
    "beta_cycles_per_relay": Parameter(float, "cycles", 0, False, 1e9),
    "link_bytes_per_cycle": Parameter(float, "bytes per cycle", 0, True, 1e9),
    "router_queue_bytes": Parameter(float, "bytes", 0, False, 2 ** 30),
    "flops_per_cycle": Parameter(float, "FLOPs per cycle", 0, True, 1e9),
    "vector_op_cycles": Parameter(float, "cycles", 0, False, 1e9),
    "scalar_op_cycles": Parameter(float, "cycles", 0, False, 1e9),
    "transfer_start_cycles": Parameter(float, "cycles", 0, False, 1e9),
    "routes_per_core": Parameter(int, "routes", 1, False, 2 ** 16),
    "element_bytes": Parameter(int, "bytes", 1, False, 64),
    "pj_per_flop_fp16": Parameter(float, "pJ per FLOP", 0, False, 1e6, optional=True),
    "pj_per_flop_fp32": Parameter(float, "pJ per FLOP", 0, False, 1e6, optional=True),
    "pj_per_sram_byte_read": Parameter(float, "pJ per byte", 0, False, 1e6, optional=True),
    "pj_per_sram_byte_written": Parameter(float, "pJ per byte", 0, False, 1e6, optional=True),
    "pj_per_byte_hop": Parameter(float, "pJ per byte per hop", 0, False, 1e6, optional=True),
    "static_watts_per_core": Parameter(float, "W", 0, False, 1e3, optional=True),
}
ENERGY_KEYS = tuple(key for key, parameter in SCHEMA.items() if parameter.optional)


def from_document(doc: dict, origin: str) -> Hardware:
    """The profile a parsed JSON document describes, every parameter checked against :data:`SCHEMA`."""
    kwargs, sources, guessed = {}, {}, []
    for key in ("name", "description"):
        value = doc.get(key, "" if key == "description" else origin)
        if not isinstance(value, str):
            raise UsageError(f"hardware profile {origin}: {key} must be a string, got {json.dumps(value)}")
        kwargs[key] = value
    for key, parameter in SCHEMA.items():
        where = f"hardware profile {origin}: {key}"
        if key not in doc and parameter.optional:
            continue
        if key not in doc:
            raise UsageError(f"hardware profile {origin}: missing parameter {key!r}")
        entry = doc[key]
        if isinstance(entry, dict):
            if "value" not in entry:
                raise UsageError(f"{where}: the entry has no \"value\" (expected "
                                 "{\"value\": ..., \"source\": ..., \"guessed\": ...} or a bare number)")
            source, guess = entry.get("source", ""), entry.get("guessed", False)
            if not isinstance(source, str) or not isinstance(guess, bool):
                raise UsageError(f"{where}: \"source\" must be a string and \"guessed\" true or false")
            sources[key] = source
            if guess:
                guessed.append(key)
            entry = entry["value"]
        kwargs[key] = parameter.parse_json(entry, where)
    unknown = sorted(set(doc) - set(SCHEMA) - {"name", "description"})
    if unknown:
        raise UsageError(f"hardware profile {origin}: unknown parameter {unknown[0]!r} "
                         f"(known: {', '.join(SCHEMA)})")
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
        origin = str(path)
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise UsageError(f"hardware profile {origin}: not a text file (it is not UTF-8)") from None
        except OSError as exc:
            raise UsageError(f"hardware profile {origin}: cannot read it ({exc.strerror or exc})") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"hardware profile {origin}: invalid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(doc, dict):
        raise UsageError(f"hardware profile {origin}: expected a JSON object")
    return from_document(doc, origin).with_overrides(overrides)
