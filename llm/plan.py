"""What fits before a long run: ``python -m llm plan`` and the hint of every too-small mesh.

A region is probed the way ``generate`` uses it, as a dry run: one layer of prefill on the
square prefill region (every layer has the same buffers), then the decode region's plan
(layers per region, KV capacity, :func:`llm.decode.plan_regions`) with the prompt's cache in
place and one decode step. A probe that runs out of core memory says which buffer did not fit.
The smallest square mesh is found by doubling then bisecting the side (memory per core does not
grow with the side), up to the shorter side of the profile's wafer: first with the decode plan
alone (no run), then with whole probes from there.
"""
from __future__ import annotations

import contextlib

from meshmpi import CoreMemoryError, Mesh, UsageError, cli
from meshmpi.mesh import parse_grid

from .decode import POLICIES, Decoder
from .prefill import prefill


def regions_text(r: dict) -> str:
    """'1 (all 32 layers + LM head)' or '5 (up to 9 layers each, the last 4 + LM head)'."""
    if int(r["regions"]) == 1:
        return f"1 (all {r['layers_per_region']} layers + LM head)"
    each = f"up to {r['layers_per_region']} layer{'s' if int(r['layers_per_region']) > 1 else ''} each"
    return f"{r['regions']} ({each}, the last {r['last_region_layers']} + LM head)"


def kv_rows(policy: str, total_tokens: int, rows: int) -> int:
    """Tokens of KV buffer per row of the decode region for a context of ``total_tokens``."""
    return total_tokens if policy == "concat" else -(-total_tokens // rows) + 1


class Planner:
    """Probes regions for one model, context, KV policy, hardware and allreduce options."""

    def __init__(self, config, hardware, prompt_tokens: int, new_tokens: int, kv: str = "shift",
                 allreduce: str = "ktree", forwarding: str = "stream"):
        self.config, self.hardware, self.kv = config, hardware, kv
        self.prompt_tokens, self.new_tokens = prompt_tokens, new_tokens
        self.allreduce, self.forwarding = allreduce, forwarding
        self._probed = {}

    @property
    def context(self) -> int:
        return self.prompt_tokens + self.new_tokens

    def _mesh(self, rows: int, cols: int) -> Mesh:
        return Mesh(rows, cols, self.hardware, dry_run=True, memory="strict", routes="warn")

    def probe(self, rows: int, cols: int, side: int | None = None) -> dict:
        """The plan of a ``rows x cols`` decode region with a ``side``-square prefill region
        (default the largest square inside): ``fits`` and, when not, ``reason``."""
        side = side or min(rows, cols)
        key = (rows, cols, side)
        if key not in self._probed:
            self._probed[key] = self._probe(rows, cols, side)
        return self._probed[key]

    def _probe(self, rows: int, cols: int, side: int) -> dict:
        out = {"mesh": f"{rows}x{cols}", "prefill_mesh": f"{side}x{side}", "fits": False, "reason": None}
        for stage, run, (r, c) in (("prefill", self._prefill, (side, side)), ("decode", self._decode, (rows, cols))):
            try:
                mesh = self._mesh(r, c)
            except UsageError as exc:       # the job's ranks cannot be laid over it
                out["reason"] = str(exc)
                return out
            try:
                decoder = run(mesh)
                out[f"{stage}_peak_bytes_per_core"] = int(mesh.max_over_ranks(int(mesh.memory.peak.max(initial=0))))
            except (CoreMemoryError, UsageError) as exc:
                out["reason"] = f"{stage} on {r}x{c}: {exc}"
                return out
            finally:
                mesh.free()
        plan = decoder.plan
        out.update(fits=True, regions=plan.regions, layers_per_region=plan.layers_per_region,
                   last_region_layers=plan.last_region_layers, cores_used=plan.regions * rows * cols,
                   weight_bytes_per_core=plan.weight_bytes_per_core,
                   kv_bytes_per_token_per_core=plan.kv_bytes_per_token_per_core,
                   kv_capacity_tokens=plan.capacity(self.kv, rows, self.prompt_tokens),
                   kv_capacity_by_policy={p: plan.capacity(p, rows, self.prompt_tokens) for p in POLICIES})
        return out

    def _prefill(self, mesh) -> None:
        prefill(mesh, self.config, None, self.prompt_tokens, layers=1, forwarding=self.forwarding)

    def _decode(self, mesh) -> Decoder:
        decoder = Decoder(mesh, self.config, None, self.kv, 1, kv_rows(self.kv, self.context, mesh.rows),
                          self.allreduce, None, forwarding=self.forwarding)
        decoder.load_prompt_cache(None, None, self.prompt_tokens)
        decoder.step(None, self.prompt_tokens)
        return decoder

    @property
    def largest_side(self) -> int:
        return min(self.hardware.mesh_rows, self.hardware.mesh_cols)

    def _decode_plan_fits(self, n: int) -> bool:
        """Whether the decode plan of an n x n region fits (cheap: no prefill, no step)."""
        try:
            mesh = self._mesh(n, n)
        except UsageError:
            return False
        try:
            Decoder(mesh, self.config, None, self.kv, 1, kv_rows(self.kv, self.context, n), self.allreduce,
                    None, forwarding=self.forwarding)
            return True
        except (CoreMemoryError, UsageError):
            return False
        finally:
            mesh.free()

    def _first(self, good, low: int) -> int | None:
        """The smallest side n > low with good(n) (good(low) false or low = 0), by doubling the
        distance from low then bisecting; None when no side of the wafer is good."""
        step, high = 1, low + 1
        while high <= self.largest_side and not good(high):
            low, step = high, 2 * step
            high = min(low + step, self.largest_side) if low < self.largest_side else low + 1
        if high > self.largest_side:
            return None
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (low, middle) if good(middle) else (middle, high)
        return high

    def smallest_square(self, one_region: bool = False) -> dict | None:
        """The probe of the smallest square mesh that holds the run (``one_region``: all layers
        and the LM head in one region), or None when no square of the wafer does. The cheap
        decode plan narrows the search first; the full probe (prefill included) then starts there."""
        start = self._first(self._decode_plan_fits, 0)
        if start is None:
            return None

        def good(n):
            p = self.probe(n, n)
            return p["fits"] and (p["regions"] == 1 or not one_region)

        side = self._first(good, start - 1)
        return None if side is None else self.probe(side, side)

    def hint(self) -> str:
        """What would fit, for the end of a message about a region that does not."""
        best = self.smallest_square()
        what = f"this model and a {self.context:,}-token context (KV {self.kv})"
        if best is None:
            return (f"; no square region of the {self.hardware.name} wafer (up to {self.largest_side}x"
                    f"{self.largest_side}) holds {what}")
        return f"; the smallest square mesh for {what} is --mesh {best['mesh']} (regions: {regions_text(best)})"


@contextlib.contextmanager
def hint_on_failure(planner: Planner):
    """Add :meth:`Planner.hint` to a core memory failure or a region plan that does not fit."""
    try:
        yield
    except CoreMemoryError as exc:
        raise CoreMemoryError(f"{exc}{planner.hint()}") from None
    except UsageError as exc:
        if "per core" not in str(exc):
            raise
        raise UsageError(f"{exc}{planner.hint()}") from None


# ------------------------------------------------------------------ python -m llm plan
EXAMPLES = """\
  python -m llm plan --model tiny --prompt-len 64 --max-new-tokens 64
  python -m llm plan --model ./SmolLM2-135M-Instruct --prompt-len 512 --max-new-tokens 256 --mesh 48x48 --json
"""


def register(sub) -> None:
    g = sub.add_parser("plan", help="what a run needs: regions, memory per core, KV capacity, smallest meshes",
                       epilog="examples:\n" + EXAMPLES, formatter_class=sub._parser_class().formatter_class)
    g.add_argument("--model", default="tiny", help="tiny, a preset, a HF directory or a .gguf file")
    g.add_argument("--prompt-len", type=int, default=8, help="prompt tokens (default 8)")
    g.add_argument("--max-new-tokens", type=int, default=16)
    g.add_argument("--mesh", metavar="ROWSxCOLS", help="also plan this decode region")
    g.add_argument("--prefill-mesh", metavar="NxN", help="the (square) prefill region (default: the largest square in --mesh)")
    g.add_argument("--kv", choices=POLICIES, default="shift", help="KV cache policy of the smallest meshes (default shift)")
    g.add_argument("--allreduce", choices=("ktree", "pipeline", "ring"), default="ktree")
    g.add_argument("--forwarding", choices=("stream", "store"), default="stream")
    g.add_argument("--json", action="store_true", help="print one JSON object (rank 0) instead of text")
    g.add_argument("--hardware", default="wse2", metavar="NAME|PATH", help="profile: wse2, wse3 or a JSON file")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one profile value")
    g.set_defaults(func=plan_command, dry_run=True)


def run_plan(args) -> dict:
    """The whole ``plan`` command; returns the report (every rank)."""
    from .generate import _load_model
    if args.prompt_len < 1 or args.max_new_tokens < 1:
        raise UsageError("--prompt-len and --max-new-tokens must be at least 1")
    hardware = cli.hardware_from_args(args)
    config, _, _ = _load_model(args)
    planner = Planner(config, hardware, args.prompt_len, args.max_new_tokens, args.kv, args.allreduce,
                      args.forwarding)
    report = {"model": args.model, "hardware": hardware.name, "prompt_tokens": args.prompt_len,
              "new_tokens": args.max_new_tokens, "context_tokens": planner.context, "kv_policy": args.kv,
              "layers": config.num_hidden_layers, "sram_bytes_per_core": hardware.sram_bytes_per_core,
              "mesh": None}
    if args.mesh:
        rows, cols = parse_grid(args.mesh)
        side = None
        if args.prefill_mesh:
            side, other = parse_grid(args.prefill_mesh, "prefill-mesh")
            if side != other or side > min(rows, cols):
                raise UsageError(f"--prefill-mesh must be a square inside --mesh {args.mesh}, got {args.prefill_mesh}")
        report["mesh"] = planner.probe(rows, cols, side)
    report["smallest_mesh"] = planner.smallest_square()
    report["smallest_single_region_mesh"] = planner.smallest_square(one_region=True)
    return report


def plan_command(args) -> int:
    report = run_plan(args)
    if args.json:
        cli.print_json(report)
    else:
        cli.say(format_plan(report))
    return 0


def _describe(p: dict | None, label: str) -> list[str]:
    if p is None:
        return [f"{label}: none on the wafer"]
    if not p["fits"]:
        return [f"{label}: {p['mesh']} (prefill {p['prefill_mesh']}) does not fit: {p['reason']}"]
    kv = p["kv_capacity_by_policy"]
    return [f"{label}: {p['mesh']} (prefill {p['prefill_mesh']})",
            f"  regions           {regions_text(p)} ({p['cores_used']:,} cores)",
            f"  memory per core   weights {p['weight_bytes_per_core']:,} B, peak prefill "
            f"{p['prefill_peak_bytes_per_core']:,} B, peak decode {p['decode_peak_bytes_per_core']:,} B",
            f"  KV capacity       {kv['shift']:,} tokens (shift), {kv['concat']:,} (concat)"]


def format_plan(r: dict) -> str:
    lines = [f"{r['model']}: {r['layers']} layers, {r['prompt_tokens']:,}-token prompt + {r['new_tokens']:,} new "
             f"= {r['context_tokens']:,}-token context, KV {r['kv_policy']}, {r['hardware']} "
             f"({r['sram_bytes_per_core']:,} B per core)"]
    if r["mesh"] is not None:
        lines += _describe(r["mesh"], "--mesh")
    lines += _describe(r["smallest_mesh"], "smallest square mesh")
    lines += _describe(r["smallest_single_region_mesh"], "smallest square mesh in one region")
    return "\n".join(lines)
