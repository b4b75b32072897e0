"""The plumbing every bench shares (kernels and llm): output folders, CSVs that are whole after
every row, figures, a progress bar over runs, and the ``--meshes`` option."""
from __future__ import annotations

import csv
import sys
from pathlib import Path

from . import cli, outputs
from .errors import UsageError


def add_out_options(p, pngs: str, csvs: str) -> None:
    p.add_argument("--out", metavar="DIR", help="output folder (default: a new folder results/runs/<time>, "
                   "named on stderr; --out results refreshes the committed results)")
    p.add_argument("--replot", action="store_true", help=f"only redraw the {pngs} from the {csvs} in --out")


def out_dir(args) -> Path:
    """--out, or a fresh folder; --replot needs the folder of an earlier run."""
    if args.out is None:
        if args.replot:
            raise UsageError("--replot redraws the figures of an earlier run: give its folder with --out DIR")
        args.out = cli.fresh_run_dir()
        cli.say(f"writing into {args.out} (--out DIR to choose)", file=sys.stderr)
    return Path(args.out)


class CsvTable:
    """A CSV that is whole after every row: ``add`` rewrites it (atomically, rank 0), so an
    interrupted bench leaves the rows it finished."""

    def __init__(self, path: Path):
        self.path, self.rows = Path(path), []

    def add(self, row: dict) -> None:
        self.rows.append(row)
        write_csv(self.path, self.rows, quiet=True)

    def update(self, index: int, fields: dict) -> None:
        """Add ``fields`` to row ``index`` and rewrite the file."""
        self.rows[index].update(fields)
        write_csv(self.path, self.rows, quiet=True)

    def close(self) -> list[dict]:
        if _is_root() and self.rows:
            cli.say(f"wrote {self.path}", file=sys.stderr)
        return self.rows


def parse_sides(args, default):
    if not args.meshes:
        return default
    try:
        sides = tuple(int(s) for s in args.meshes.split(","))
    except ValueError:
        raise UsageError(f"--meshes expects a comma list of whole numbers, got {args.meshes!r}") from None
    if any(s < 1 for s in sides):
        raise UsageError("--meshes: sides must be positive")
    return sides


DEFECT_RATES = "0,0.01,0.02,0.03,0.05,0.07,0.1"


def parse_rates(text: str, option: str) -> list[float]:
    """A comma list of defect rates (each in meshmpi.defects' range), ascending."""
    from .defects import MAX_RATE
    try:
        rates = sorted({float(r) for r in text.split(",") if r.strip()})
    except ValueError:
        raise UsageError(f"{option} expects a comma list of rates like {DEFECT_RATES}, got {text!r}") from None
    if not rates or rates[0] < 0 or rates[-1] > MAX_RATE:
        raise UsageError(f"{option}: rates must be in [0, {MAX_RATE}], got {text!r}")
    return rates


def mean_over_seeds(rows: list[dict], field: str) -> list[tuple[float, float]]:
    """(rate, mean of ``field``) for each rate of ``rows`` (the draws of a defect sweep)."""
    rates = sorted({float(r["rate"]) for r in rows})
    return [(x, sum(float(r[field]) for r in rows if float(r["rate"]) == x)
             / sum(1 for r in rows if float(r["rate"]) == x)) for x in rates]


def plot_over_rates(ax, rows: list[dict], group, field: str, label) -> None:
    """Each group of a defect sweep (``group(row)`` a key, ``label(key)`` its name): ``field``
    against the rate in %, every draw a dot, their mean a line."""
    for index, key in enumerate(dict.fromkeys(group(r) for r in rows)):
        mine = [r for r in rows if group(r) == key]
        ax.plot([100 * float(r["rate"]) for r in mine], [float(r[field]) for r in mine], ".",
                color=f"C{index}", alpha=0.5)
        means = mean_over_seeds(mine, field)
        ax.plot([100 * x for x, _ in means], [y for _, y in means], "-", color=f"C{index}", label=label(key))
    ax.set_xlabel("dead cores (% of the physical wafer)")
    ax.grid(alpha=0.3)


def _is_root() -> bool:
    return cli.world_rank() == 0


def progress(total: int, desc: str):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="run", disable=not _is_root(), file=sys.stderr,
                dynamic_ncols=True)


def write_csv(path: Path, rows: list[dict], quiet: bool = False) -> None:
    if not _is_root() or not rows:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = list(dict.fromkeys(k for row in rows for k in row))

    def write(tmp):
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)

    outputs.write_atomic(path, write)
    if not quiet:
        cli.say(f"wrote {path}", file=sys.stderr)


def figure(ncols: int, nrows: int = 1, width: float = 4.2, height: float = 3.4):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False)
    return plt, fig, axes


def save_figure(plt, fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    cli.say(f"wrote {path}", file=sys.stderr)


def mesh_axis(ax, sides) -> None:
    ax.set_xscale("log")
    ax.minorticks_off()
    ax.set_xticks(sorted(set(sides)))
    ax.set_xticklabels([str(s) for s in sorted(set(sides))], fontsize=7)


def read_csv(path: Path) -> list[dict]:
    """A bench's CSV back, numbers as numbers; a one-line error when the bench has not run."""
    if not Path(path).exists():
        raise UsageError(f"{path}: no such file (run the bench first)")

    def value(text):
        for kind in (int, float):
            try:
                return kind(text)
            except ValueError:
                pass
        return {"True": True, "False": False}.get(text, text)
    with open(path, newline="") as f:
        return [{k: value(v) for k, v in row.items()} for row in csv.DictReader(f)]

