"""``python -m kernels``: run MeshGEMM, MeshGEMV and their baselines on the emulated wafer."""
from __future__ import annotations

import numpy as np

from meshmpi import cli, energy
from meshmpi.errors import CheckError, UsageError
from meshmpi.mesh import parse_grid
from meshmpi.text import plural
from meshmpi.trace import write_trace

from .allreduce import FORWARDING
from .baselines import ROUTING
from .run import BASELINE_ALGOS, GEMM_ALGOS, GEMV_ALGOS, run_baseline, run_gemm, run_gemv

EXAMPLES = """\
  mpiexec -n 4 python -m kernels gemm --algo meshgemm --mesh 8x8 --m 512 --k 512 --n 512
  python -m kernels gemm --algo summa --mesh 720x720 --m 2048 --k 2048 --n 2048 --dry-run --json
  python -m kernels gemm --algo summa --broadcast direct --mesh 64x64 --m 2048 --k 2048 --n 2048 --dry-run --routes warn
  mpiexec -n 2 python -m kernels gemv --algo meshgemv --mesh 32x32 --m 4096 --n 4096 --groups 4
  python -m kernels gemv --algo ladder --mesh 64x64 --m 4096 --n 4096 --dry-run --memory warn
  mpiexec -n 2 python -m kernels gemm --algo t10 --mesh 6x6 --m 20 --k 50 --n 70
  python -m kernels bench gemm --out results
"""


def _positive(name):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise UsageError(f"--{name} expects a whole number, got {text!r}") from None
        if value < 1:
            raise UsageError(f"--{name} must be at least 1, got {value}")
        return value
    return parse


def build_parser():
    p = cli.parser("python -m kernels", "Distributed kernels on the emulated wafer.", EXAMPLES)
    sub = p.add_subparsers(dest="command", required=True)
    for name, algos, help_ in (("gemm", GEMM_ALGOS, "C = A @ B (A is m x k, B is k x n)"),
                               ("gemv", tuple(GEMV_ALGOS) + BASELINE_ALGOS, "y = x @ W (x is 1 x m, W is m x n)")):
        s = sub.add_parser(name, help=help_, description=help_, epilog="examples:\n" + EXAMPLES,
                           formatter_class=p.formatter_class)
        s.add_argument("--algo", choices=algos, default=algos[0])
        s.add_argument("--mesh", required=True, metavar="ROWSxCOLS")
        s.add_argument("--m", type=_positive("m"), required=True)
        if name == "gemm":
            s.add_argument("--k", type=_positive("k"), required=True)
            s.add_argument("--broadcast", choices=("relay", "direct"), default="relay",
                           help="summa only: forward panels hop by hop in software (relay, O(1) "
                                "routes) or multicast on a route per root (direct, R+C routes)")
        else:
            s.add_argument("--groups", type=_positive("groups"),
                           help="K-tree groups per line (default about sqrt(N))")
            s.add_argument("--forwarding", choices=FORWARDING, default="stream",
                           help="how a chain core forwards: add and send as the data streams past "
                                "(stream, as the wafer's fabric add does) or receive it all first (store)")
        s.add_argument("--routing", choices=ROUTING,
                       help="ladder only: forward its long-range fetches hop by hop in software "
                            "(relay, the default) or on a pass-through route each (direct)")
        s.add_argument("--ring", type=_positive("ring"),
                       help="t10 only: cores per compute-shift ring (default: T10's own choice)")
        s.add_argument("--n", type=_positive("n"), required=True)
        s.add_argument("--dtype", choices=("float32", "float64"), default="float32")
        s.add_argument("--seed", type=int, default=0)
        cli.add_hardware_options(s)
        cli.add_defect_options(s)
        cli.add_run_options(s)
        s.set_defaults(func=run_kernel)
    from .bench import register
    register(sub)
    return p


def run_kernel(args, argv=None) -> int:
    rows, cols = parse_grid(args.mesh)
    for option, algo in (("routing", "ladder"), ("ring", "t10")):
        if getattr(args, option) is not None and args.algo != algo:
            raise UsageError(f"--{option} is for --algo {algo}; {args.algo} has none")
    if args.command == "gemm" and args.broadcast != "relay" and args.algo != "summa":
        raise UsageError(f"--broadcast is for --algo summa; {args.algo} has none")
    if args.command == "gemv":
        if args.algo in BASELINE_ALGOS and args.forwarding != "stream":
            raise UsageError(f"--forwarding is for the MeshGEMV allreduces; {args.algo} has none")
    if args.command == "gemv" and args.groups is not None:
        if args.algo != "meshgemv":
            raise UsageError(f"--groups is for --algo meshgemv (K-tree groups); {args.algo} has none")
        if args.groups > rows:
            raise UsageError(f"--groups {args.groups}: more groups than the {rows} cores of a column of "
                             f"--mesh {args.mesh} (the reduction runs along the columns)")
    cli.check_fits(args, (rows, cols), f"--mesh {args.mesh}")
    cli.check_outputs(args)
    mesh = cli.mesh_from_args(args, rows, cols)
    dtype = np.dtype(args.dtype)
    if args.command == "gemm":
        options = {} if args.algo not in BASELINE_ALGOS else {"routing": args.routing or "relay", "ring": args.ring}
        report = run_gemm(mesh, args.algo, args.m, args.k, args.n, dtype, args.seed, args.broadcast, **options)
    elif args.algo in BASELINE_ALGOS:
        report = run_baseline(mesh, args.algo, args.m, args.n, dtype, args.seed,
                              args.routing or "relay", args.ring)
    else:
        report = run_gemv(mesh, args.algo, args.m, args.n, args.groups, dtype, args.seed, args.forwarding)
    report["warnings"] = mesh.memory.warnings + mesh.routes.warnings
    if args.trace:
        write_trace(mesh, args.trace, kind=args.command, result=report)
    if args.json:
        cli.print_json(report)
    else:
        cli.say(format_report(report))
    cli.warn_summary(report["warnings"])
    if report["check_failure"]:
        raise CheckError(report["check_failure"])
    return 0


def format_report(r: dict) -> str:
    sizes = f"m={r['m']} k={r['k']} n={r['n']}" if r.get("k") else f"m={r['m']} n={r['n']}"
    lines = [f"{r['algo']} on {r['mesh']} ({r['hardware']}, {plural(r['ranks'], 'rank')}{', dry run' if r['dry_run'] else ''}), {sizes}",
             f"  modeled    {r['modeled_cycles']:,.0f} cycles = {r['modeled_seconds'] * 1e6:.3f} us "
             f"(compute {r['compute_cycles']:,.0f}, communication {r['comm_cycles']:,.0f}, "
             f"efficiency {r['efficiency']:.1%})",
             f"  fabric     {r['messages']:,} messages, {r['bytes_moved']:,} bytes, longest hop "
             f"{r['max_hops_per_step']}, {r['routes_per_core_max']} routes/core max",
             f"  memory     {r['peak_bytes_per_core']:,} B per core at peak",
             *([f"  defects    {cli.defects_text(r['defects'])}"] if r.get("defects") else []),
             *([f"  energy     {energy.describe(r)[len('energy '):]}"] if r.get("energy_joules") is not None else []),
             f"  wall       {r['wall_seconds']:.3f} s"]
    if r.get("check"):
        lines.append(f"  check      {r['check']}: max |error| vs numpy = {r['max_abs_err']:.3g} "
                     f"(bound: {r['algo']}'s floating-point forward error, elementwise)")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    cli.run(main)
