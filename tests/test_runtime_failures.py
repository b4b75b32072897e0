"""Failures end the whole job quickly, with one clear message and a non-zero exit.

These launch fresh processes (``mpiexec -n N`` or a plain ``python``), so they run in the
serial pytest session only.
"""
from __future__ import annotations

import subprocess
import time

import pytest

LIMIT_SECONDS = 20


def launch(command, env, timeout=60):
    start = time.monotonic()
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{' '.join(command)} hung for {timeout} s: {exc.stderr}")
    return done, time.monotonic() - start


def test_one_rank_crashing_ends_the_job(run_env, python_exe, mpiexec_exe, helper_script):
    done, seconds = launch([mpiexec_exe, "-n", "4", python_exe, helper_script("one_rank_fails.py"), "crash"],
                           run_env)
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    assert seconds < LIMIT_SECONDS, f"took {seconds:.1f} s"
    assert output.count("boom-7f3a") == 1, output
    assert output.count("error (rank 2)") == 1 and "error (rank 0)" not in output, output
    # One traceback, the failure's: nothing else goes wrong on the way out.
    assert output.count("Traceback") == 1, output


def test_one_rank_breaking_locality_ends_the_job(run_env, python_exe, mpiexec_exe, helper_script):
    done, seconds = launch([mpiexec_exe, "-n", "4", python_exe, helper_script("one_rank_fails.py"),
                            "locality"], run_env)
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    assert seconds < LIMIT_SECONDS, f"took {seconds:.1f} s"
    lines = [line for line in output.splitlines() if "not a Cartesian neighbour" in line]
    assert len(lines) == 1 and lines[0].startswith("error (rank 2): rank 2 tried to message rank 0"), output


def test_collective_error_is_printed_once(run_env, python_exe, mpiexec_exe, helper_script):
    done, seconds = launch([mpiexec_exe, "-n", "4", python_exe, helper_script("one_rank_fails.py"), "usage"],
                           run_env)
    output = done.stdout + done.stderr
    assert done.returncode == 2, output
    assert [line for line in output.splitlines() if line.strip()] == \
        ["error: the same bad input on every rank"], output
    assert seconds < LIMIT_SECONDS


def test_bad_argument_gives_one_error_line(run_env, python_exe, mpiexec_exe, tmp_path):
    missing = tmp_path / "missing.h5"
    done, seconds = launch([mpiexec_exe, "-n", "2", python_exe, "-m", "meshmpi", "trace", "summary",
                            str(missing)], run_env)
    output = done.stdout + done.stderr
    assert done.returncode != 0
    errors = [line for line in output.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and errors[0].startswith("error: ") and "missing.h5" in errors[0], output
    assert "Traceback" not in output


def test_unknown_option_gives_one_error_line(run_env, python_exe, mpiexec_exe):
    done, _ = launch([mpiexec_exe, "-n", "2", python_exe, "-m", "meshmpi", "info", "--frobnicate"], run_env)
    output = done.stdout + done.stderr
    assert done.returncode != 0
    errors = [line for line in output.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and "--frobnicate" in errors[0], output


def test_slurm_tasks_with_a_one_rank_world_fail_clearly(run_env, python_exe):
    env = dict(run_env, SLURM_STEP_NUM_TASKS="2")
    done, _ = launch([python_exe, "-m", "meshmpi", "info"], env)
    output = done.stdout + done.stderr
    assert done.returncode != 0
    errors = [line for line in output.splitlines() if line.startswith("error")]
    assert len(errors) == 1, output
    assert "SLURM started 2 tasks" in errors[0] and "world of size 1" in errors[0] and "--mpi=pmi2" in errors[0]


def test_info_runs_on_a_plain_world(run_env, python_exe):
    done, _ = launch([python_exe, "-m", "meshmpi", "info", "--json"], dict(run_env, SLURM_STEP_NUM_TASKS="1"))
    assert done.returncode == 0, done.stderr
    import json
    doc = json.loads(done.stdout)
    assert doc["mpi_world_size"] == 1 and set(doc["profiles"]) == {"wse2", "wse3"}
