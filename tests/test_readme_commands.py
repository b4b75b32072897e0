"""Every command in README.md's ``bash`` blocks runs (serial: each starts its own processes).

The commands are read from README.md. Each is run as written, or as its entry in SUBSTITUTE
(smaller sizes, at most 2 ranks, a small model instead of a download, the optional
``[--json]`` spelled out), or is listed in SKIP with the reason it cannot run here. A README
command in none of them fails the test, and so does a table entry no longer in README.md.
They run in a scratch folder, the trace tools last (they read the traces the runs wrote).
"""
from __future__ import annotations

import argparse
import csv
import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY_GENERATE = "python -m llm generate --model tiny --max-new-tokens 3 --mesh 8x8"

SKIP = {
    "make run": "sets .venv up from nothing; its generate step is the first LLaMA example",
    "make test": "the whole test suite",
    "python3 -m venv .venv && .venv/bin/pip install -e '.[mpich,llm,plot,test]'": "installs the package",
    "module load python mpi": "site-specific cluster set-up",
    "python -m venv ~/venvs/meshmpi && source ~/venvs/meshmpi/bin/activate": "cluster install",
    "pip install --no-binary mpi4py mpi4py": "cluster install (compiles mpi4py)",
    "pip install -e '.[llm,plot]'": "cluster install",
    "srun -n 2 --mpi=pmi2 python -m meshmpi info": "SLURM (tests/slurm runs it on a real SLURM)",
    "sbatch slurm/run.sbatch python -m kernels gemm --algo meshgemm --mesh 8x8 --m 256 --k 256 --n 256":
        "SLURM (tests/slurm)",
    "sbatch --ntasks=16 slurm/run.sbatch python -m llm generate --model tiny --mesh 16x16 --max-new-tokens 32":
        "SLURM (tests/slurm)",
    "slurm/submit_sweep.sh --account=abc123 --partition=cpu": "SLURM (tests/slurm)",
    'MESHMPI_SCALING=weak MESHMPI_KERNEL=gemv MESHMPI_RANKS="1 4 16 64" sbatch --ntasks=64 slurm/scaling.sbatch':
        "SLURM (tests/slurm)",
    "python -m meshmpi results collect results/slurm/sweep-81234 -o results/sweep.csv":
        "the same command as the sweep-42 one, on a sweep's output folder",
    'python -m llm generate --model ./SmolLM2-135M-Instruct --chat "What is a wafer?" --system "Be brief." --mesh 48x48':
        "a downloaded checkpoint; chat templates are tested on small ones (tests/test_llm_text.py)",
    'python -m llm generate --model ./smollm2-135m-instruct-q8_0.gguf --prompt "Once upon a time" --mesh 48x48':
        "a downloaded GGUF file; GGUF loading is tested on written ones (tests/test_llm_gguf.py)",
    "python -m llm plan --model ./SmolLM2-135M-Instruct --prompt-len 512 --max-new-tokens 256 [--mesh 32x32] [--json]":
        "a downloaded checkpoint; plan is tested against generate (tests/test_llm_plan.py)",
}

# README command -> (what runs instead, why)
SUBSTITUTE = {
    "mpiexec -n 4 python -m kernels gemm --algo meshgemm --mesh 8x8 --m 512 --k 512 --n 512":
        ("mpiexec -n 2 python -m kernels gemm --algo meshgemm --mesh 8x8 --m 64 --k 64 --n 64 --trace a.h5",
         "2 ranks, smaller matrices; writes a.h5 for the trace tools"),
    "mpiexec -n 2 python -m kernels gemm --algo cannon --mesh 3x5 --m 100 --k 70 --n 33 --dtype float64":
        ("mpiexec -n 2 python -m kernels gemm --algo cannon --mesh 3x5 --m 100 --k 70 --n 33 --dtype float64 "
         "--trace b.h5", "writes b.h5 for the trace tools"),
    "python -m kernels gemm --algo meshgemm --mesh 720x720 --m 2048 --k 2048 --n 2048 --dry-run --json":
        ("python -m kernels gemm --algo meshgemm --mesh 90x90 --m 256 --k 256 --n 256 --dry-run --json",
         "a 720x720 dry run takes minutes"),
    "python -m kernels gemv --algo pipeline --mesh 512x512 --m 16384 --n 16384 --dry-run --forwarding store":
        ("python -m kernels gemv --algo pipeline --mesh 128x128 --m 4096 --n 4096 --dry-run --forwarding store",
         "smaller mesh and vector"),
    "python -m kernels bench all --out results":
        ("python -m kernels bench gemm --meshes 4 --out results", "all seven benches take many minutes"),
    'mpiexec -n 4 python -m llm generate --model tiny --prompt "The meaning of" --max-new-tokens 24 --mesh 8x8':
        ('mpiexec -n 2 python -m llm generate --model tiny --prompt "The meaning of" --max-new-tokens 4 --mesh 8x8',
         "2 ranks, fewer tokens"),
    'python -m llm generate --model ./Llama-3.2-1B --prompt "Hello" --mesh 64x64 --kv concat --trace run.h5':
        (f'{TINY_GENERATE} --prompt "Hello" --kv concat --trace run.h5',
         "the built-in model instead of a downloaded checkpoint; writes run.h5 for the trace tools"),
    "python -m llm generate --model llama3-8b --dry-run --prompt-len 4096 --max-new-tokens 2 --mesh 420x420 --json":
        ("mpiexec -n 2 python -m llm generate --model llama3-8b --dry-run --prompt-len 16 --max-new-tokens 2 "
         "--mesh 176x176 --json", "a shorter context on the smallest region one layer fits"),
    "mpiexec -n 2 python -m llm generate --model llama3-8b --dry-run --prompt-len 32 --max-new-tokens 2 --mesh 420x420 "
    "--layers all":
        ("mpiexec -n 2 python -m llm generate --model tiny --dry-run --prompt-len 8 --max-new-tokens 2 --mesh 8x8 "
         "--layers all", "every layer of the built-in model; llama3-8b's on 420² takes about 12 s"),
    "mpiexec -n 2 python -m llm bench --out results":
        ("mpiexec -n 2 python -m llm bench --models llama3-8b --meshes 16 --prompt-len 8 --new-tokens 2 "
         "--out results", "one preset on one small region (a table entry: it does not fit)"),
    "python -m llm bench --strategies --out results":
        ("python -m llm bench --strategies waferllm,megatron,t10 --models llama3-8b --meshes 176 --prompt-len 16 "
         "--out results", "one preset on a small region, Ladder left out (its all-to-all takes minutes)"),
    "python -m llm bench --models llama3-8b --e2e --prefill-side 660 --meshes 360 --out results":
        ("python -m llm bench --models llama3-8b --e2e 16/3 --prefill-side 200 --meshes 160 --decode-samples 2 "
         "--out results", "one short request on small regions"),
    "python -m kernels bench defects --out results":
        ("python -m kernels bench defects --meshes 8 --rates 0,0.05 --seeds 1 --out results",
         "one small mesh, two rates"),
    "python -m llm bench --defects --out results":
        ("python -m llm bench --defects 0,0.05 --seeds 1 --meshes 176 --prompt-len 16 --out results",
         "two rates on the smallest region one layer fits"),
    "python -m meshmpi sweep --hardware wse3 --grid sram_bytes_per_core=48K,96K mesh=360x360,420x420 --out "
    "results/runs/sram -- llm generate --model llama3-8b --dry-run --prompt-len 4096 --max-new-tokens 4 --layers 1":
        ("python -m meshmpi sweep --hardware wse3 --grid sram_bytes_per_core=48K,96K --out sram -- llm generate "
         "--model tiny --dry-run --prompt-len 8 --max-new-tokens 3 --mesh 8x8",
         "four paper-scale dry runs take minutes: two points of the built-in model"),
    "python -m meshmpi info [--json]": ("python -m meshmpi info --json", "the option spelled out"),
    "python -m meshmpi trace summary run.h5 [--json]":
        ("python -m meshmpi trace summary run.h5 --json", "the option spelled out"),
    "python -m meshmpi trace plot run.h5 -o plots/":
        ("python -m meshmpi trace plot a.h5 -o plots/", "a kernel trace draws faster than a generate trace"),
    "python -m meshmpi trace compare a.h5 b.h5 [--json]":
        ("python -m meshmpi trace compare a.h5 b.h5 --json", "the option spelled out"),
    "python -m meshmpi trace export run.h5 --format chrome -o run.json [--cores 0:8,0:8]":
        ("python -m meshmpi trace export run.h5 --format chrome -o run.json --cores 0:8,0:8",
         "the option spelled out"),
}


def readme_commands() -> list[str]:
    """The lines of README.md's bash blocks, each without its trailing comment (a ``#`` after
    two spaces)."""
    text = (REPO / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            commands.append(re.split(r"\s{2,}#", line)[0].strip())
    return commands


def test_every_readme_command_is_run_or_skipped_with_a_reason():
    commands = readme_commands()
    assert len(commands) > 20
    unlisted = [c for c in commands if c not in SKIP and c not in SUBSTITUTE and c.split()[0] != "python"
                and not c.startswith("mpiexec")]
    assert unlisted == [], "README commands neither run nor skipped with a reason"
    stale = [c for c in (*SKIP, *SUBSTITUTE) if c not in commands]
    assert stale == [], "table entries that are no longer README commands"
    for replacement, _ in SUBSTITUTE.values():
        ranks = re.match(r"mpiexec -n (\d+) ", replacement)
        assert not ranks or int(ranks.group(1)) <= 2, replacement


def _argv(command: str, python: str, mpiexec: str) -> list[str]:
    argv = shlex.split(command)
    return [mpiexec if a == "mpiexec" else python if a == "python" else a for a in argv]


def test_readme_commands_run(tmp_path, run_env, python_exe, mpiexec_exe):
    commands = [c for c in readme_commands() if c not in SKIP]
    # runs first, then the trace tools (they read the traces the runs wrote)
    commands.sort(key=lambda c: " -m meshmpi " in f" {c} ")
    sweep = tmp_path / "results" / "slurm" / "sweep-42"
    for command in commands:
        run = SUBSTITUTE.get(command, (command, ""))[0]
        if "results collect results/slurm/sweep-42" in run:   # a sweep's folder: two of the traces
            sweep.mkdir(parents=True)
            for name in ("a.h5", "b.h5"):
                (sweep / name).write_bytes((tmp_path / name).read_bytes())
        done = subprocess.run(_argv(run, python_exe, mpiexec_exe), cwd=tmp_path, env=run_env,
                              capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, (run, done.stderr[-2000:])
        assert "error" not in done.stderr.lower(), (run, done.stderr[-2000:])
        if "--json" in run:
            assert isinstance(json.loads(done.stdout.strip().splitlines()[-1]), dict), run
    # what the outputs hold
    assert {p.name for p in (tmp_path / "plots").glob("*.png")} >= {"phases.png", "steps.png", "core_hops.png"}
    assert json.loads((tmp_path / "run.json").read_text())["traceEvents"]
    with open(tmp_path / "sweep.csv", newline="") as f:
        assert sorted(r["source"] for r in csv.DictReader(f)) == ["a.h5", "b.h5"]
    with open(tmp_path / "results" / "llm_presets.csv", newline="") as f:
        assert [r["mesh"] for r in csv.DictReader(f)] == ["16"]
    assert (tmp_path / "results" / "gemm.csv").is_file()
    for folder, points in (("sweep", 2), ("sram", 2)):
        with open(tmp_path / folder / "sweep.csv", newline="") as f:
            assert len([r for r in csv.DictReader(f) if not r.get("error")]) == points, folder
        assert (tmp_path / folder / "sweep.png").is_file()


def _parsers():
    """Every (sub)command's parser, by its prog name."""
    from kernels.__main__ import build_parser as kernels_parser
    from llm.generate import build_parser as llm_parser
    from meshmpi.__main__ import build_parser as meshmpi_parser
    todo, seen = [kernels_parser(), llm_parser(), meshmpi_parser()], {}
    while todo:
        p = todo.pop()
        seen[p.prog] = p
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                todo.extend(action.choices.values())
    return seen


def test_help_texts_are_plain_text():
    """No reStructuredText markup and no internal constant names in any --help."""
    parsers = _parsers()
    assert {"python -m meshmpi trace plot", "python -m kernels bench", "python -m llm bench"} <= set(parsers)
    for prog, p in parsers.items():
        text = p.format_help()
        for mark in ("``", ":func:", ":class:", "MAX_CELLS"):
            assert mark not in text, (prog, mark)


@pytest.mark.parametrize("command", ["python -m meshmpi trace plot", "python -m meshmpi trace export",
                                     "python -m kernels bench", "python -m llm bench"])
def test_readme_s_json_option_is_there(command):
    options = {o for a in _parsers()[command]._actions for o in a.option_strings}
    assert "--json" in options


def test_readme_python_blocks_run(tmp_path, run_env, python_exe):
    """Every ```python block of README.md runs as a script, as a reader would paste it."""
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    assert blocks, "README.md shows the Python API"
    for number, block in enumerate(blocks):
        script = tmp_path / f"readme_{number}.py"
        script.write_text(block)
        done = subprocess.run([python_exe, str(script)], cwd=tmp_path, env=run_env, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, (number, done.stderr[-2000:])
        assert done.stdout.strip(), number
