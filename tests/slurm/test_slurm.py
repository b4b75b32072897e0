"""The slurm/ batch scripts, submitted with sbatch to a real one-node SLURM on this host.

Needs root (to install Debian's slurm-wlm + munge if missing and to run the daemons);
skips with the reason otherwise. Jobs ask for more ranks than this host has cores, so
every submission carries --overcommit; the scripts themselves stay as a cluster user
would submit them. Marked `slurm`, so other suites can leave it out with -m "not slurm".
"""
import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from meshmpi import collect
from slurm_cluster import Cluster, SlurmUnavailable, ensure_installed

pytestmark = pytest.mark.slurm
REPO = Path(__file__).resolve().parents[2]
JOB_TIMEOUT = 150  # seconds for one `sbatch --wait`; each job also has a SLURM time limit


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("the SLURM test runs daemons and needs root")
    try:
        ensure_installed()
    except SlurmUnavailable as reason:
        pytest.skip(f"no SLURM: {reason}")
    slurm = Cluster(tmp_path_factory.mktemp("slurm"))
    try:
        slurm.start()
        yield slurm
    finally:
        slurm.stop()


@pytest.fixture
def workdir(tmp_path):
    """A submit directory with the scripts, so results/ lands in tmp, not in the repository."""
    shutil.copytree(REPO / "slurm", tmp_path / "slurm")
    return tmp_path


# Every submission waits for the job, may put more ranks than cores on this small host,
# and has a SLURM time limit (minutes) so a hung job is killed, not waited for.
WAIT = ["--wait", "--overcommit", "--time=5"]


def submit(cluster, workdir, *cmd, **env):
    """Run a submitting command in workdir; assert the job succeeded, showing its logs if not."""
    env = {**cluster.env, "MESHMPI_PYTHON": sys.executable, **env}
    done = cluster.run(*cmd, cwd=workdir, env=env, timeout=JOB_TIMEOUT)
    logs = "\n".join(f"--- {p.name}\n{p.read_text()}" for p in sorted(workdir.glob("slurm-*.out")))
    assert done.returncode == 0, f"{done.stdout}{done.stderr}\n{logs}\n{cluster.logs()}"


def job_dir(workdir, prefix=""):
    (found,) = (workdir / "results" / "slurm").glob(prefix + "*")
    return found


def world_size(info: dict) -> int:
    """The MPI world size in `meshmpi info --json`, whatever its nesting."""
    sizes = [value for key, value in collect.flatten(info).items() if key.endswith("world_size")]
    assert sizes, f"no world size in {info}"
    return sizes[0]


@pytest.mark.parametrize("launch", ["srun --mpi=pmi2", "mpiexec"])
def test_run_info_sees_all_ranks(cluster, workdir, launch):
    """The mpich wheel's mpi4py forms one world of 4 ranks under srun (PMI2) and its mpiexec."""
    if launch == "mpiexec":
        launch = str(Path(sys.executable).parent / "mpiexec")
    submit(cluster, workdir, "sbatch", *WAIT, "slurm/run.sbatch",
           "python", "-m", "meshmpi", "info", "--json", MESHMPI_LAUNCH=launch, MESHMPI_TRACE="0")
    info = json.loads((job_dir(workdir) / "result.json").read_text())
    assert world_size(info) == 4


def test_world_size_mismatch_is_a_clear_error(cluster, workdir):
    """Two tasks without PMI are two worlds of one rank: meshmpi must say so, not run twice."""
    done = cluster.run("srun", "--mpi=none", "-n", "2", sys.executable, "-m", "meshmpi", "info",
                       cwd=workdir, timeout=60)
    assert done.returncode != 0, f"meshmpi info ran two separate worlds:\n{done.stdout}"
    message = done.stderr.lower()
    assert any(word in message for word in ("--mpi", "pmi", "world size")), done.stderr


def test_run_gemm(cluster, workdir):
    submit(cluster, workdir, "sbatch", *WAIT, "slurm/run.sbatch", "python", "-m", "kernels",
           "gemm", "--algo", "meshgemm", "--mesh", "4x4", "--m", "64", "--k", "64", "--n", "64")
    out = job_dir(workdir)
    assert json.loads((out / "result.json").read_text())["ranks"] == 4
    assert (out / "result.h5").stat().st_size > 0


SWEEP = [  # ranks, command, mesh, variant, options: one of each kernel, several rank counts
    ("4", "kernels gemm", "4x4", "meshgemm", "--m 64 --k 64 --n 64"),
    ("2", "kernels gemv", "4x4", "meshgemv", "--m 64 --n 64"),
    ("1", "kernels gemm", "2x2", "meshgemm", "--m 32 --k 32 --n 32"),
]


def test_sweep_array_and_collect(cluster, workdir):
    table = workdir / "small.tsv"
    table.write_text("# a small sweep\n" + "".join("\t".join(row) + "\n" for row in SWEEP))
    submit(cluster, workdir, "slurm/submit_sweep.sh", "small.tsv", *WAIT)

    out = job_dir(workdir, "sweep-")
    for task, row in enumerate(SWEEP):
        result = json.loads((out / f"{task}.json").read_text())
        assert result["ranks"] == int(row[0]) and result["mesh"] == row[2]  # the row's world
        assert (out / f"{task}.h5").stat().st_size > 0
    done = subprocess.run([sys.executable, "-m", "meshmpi", "results", "collect", str(out),
                           "-o", "sweep.csv"], cwd=workdir, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    with open(workdir / "sweep.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [row["source"] for row in table] == ["0.json", "1.json", "2.json"]
    assert [row["algo"] for row in table] == [row[3] for row in SWEEP]


@pytest.mark.parametrize("mode, ranks", [("strong", [1, 2, 4]), ("weak", [1, 4])])
def test_scaling(cluster, workdir, mode, ranks):
    submit(cluster, workdir, "sbatch", *WAIT, "--ntasks=4", "slurm/scaling.sbatch",
           MESHMPI_SCALING=mode, MESHMPI_RANKS=" ".join(map(str, ranks)), MESHMPI_MESH="4x4",
           MESHMPI_BASE="2", MESHMPI_TILE="16")
    out = job_dir(workdir, "scaling-")
    results = [json.loads((out / f"{mode}-{k}.json").read_text()) for k in ranks]
    assert [result["ranks"] for result in results] == ranks
    assert all((out / f"{mode}-{k}.h5").exists() for k in ranks)
    if mode == "strong":  # same mesh: the rank split must not change a modeled number
        assert {result["modeled_cycles"] for result in results} == {results[0]["modeled_cycles"]}
    else:  # K ranks, 2x2 cores each
        assert [result["mesh"] for result in results] == ["2x2", "4x4"]
