"""Bad input is one clear error before the run; every output file is whole and readable.

Most cases call the commands' ``main`` in-process (serial) and expect the one-line
:class:`UsageError` that ``meshmpi.cli.run`` prints as ``error: ...`` on rank 0 before every
rank exits 2; a few launch the commands (1 and 2 ranks) to see that exit path itself.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest

import kernels.__main__ as kernels_cli
import llm.__main__ as llm_cli
import meshmpi.__main__ as meshmpi_cli
from meshmpi import UsageError, load_hardware, outputs
from meshmpi.summary import format_summary, summarize
from meshmpi.trace import read_trace
from test_llm_model import SMALL, small_tensors, write_bf16, write_model

REPO = Path(__file__).resolve().parents[1]
PROFILE = json.loads((REPO / "meshmpi" / "profiles" / "wse2.json").read_text())
TINY_CONFIG = json.loads((REPO / "llm" / "models" / "tiny" / "config.json").read_text())
GEMM = ["gemm", "--algo", "meshgemm", "--mesh", "2x2", "--m", "8", "--k", "8", "--n", "8"]
TINY = ["generate", "--model", "tiny", "--mesh", "2x2", "--prompt-ids", "1,2,3", "--max-new-tokens", "2"]


def usage_error(main, argv, *words) -> str:
    """``main(argv)`` stops with one UsageError line holding ``words``; returns the line."""
    with pytest.raises(UsageError) as info:
        main(argv)
    text = str(info.value)
    assert text and "\n" not in text, text
    for word in words:
        assert word in text, (word, text)
    return text


def files_in(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


# ------------------------------------------------------------------------ hardware profiles
def profile_with(tmp_path, key, value=None, drop_value=False, raw=None) -> str:
    path = tmp_path / "profile.json"
    doc = json.loads(json.dumps(PROFILE))
    if drop_value:
        del doc[key]["value"]
    elif key:
        doc[key]["value"] = value
    path.write_text(raw if raw is not None else json.dumps(doc))
    return str(path)


@pytest.mark.parametrize("key, value, words", [
    ("clock_hz", 0, ["positive"]), ("flops_per_cycle", 0, ["positive"]), ("clock_hz", -1e9, ["positive"]),
    ("clock_hz", float("nan"), ["not a number"]), ("link_bytes_per_cycle", 0, ["positive"]),
    ("alpha_cycles_per_hop", -1, ["negative"]), ("element_bytes", 0, ["at least 1"]),
    ("mesh_rows", -3, ["at least 1"]), ("routes_per_core", 21.9, ["whole number"]),
    ("routes_per_core", True, ["not a number"]), ("sram_bytes_per_core", -5, ["positive"]),
    ("clock_hz", "1.1e9", ["not a number"]),
])
def test_profile_values_out_of_type_or_range(tmp_path, key, value, words):
    path = profile_with(tmp_path, key, value)
    usage_error(kernels_cli.main, GEMM + ["--hardware", path], path, key, *words)


def test_profile_files_that_are_not_profiles(tmp_path):
    path = profile_with(tmp_path, None, raw="")
    Path(path).write_bytes(b"\x89HDF\r\n\x1a\n\xff\xfe\x00\x01")
    usage_error(kernels_cli.main, GEMM + ["--hardware", path], path, "not a text file")
    path = profile_with(tmp_path, "clock_hz", drop_value=True)
    usage_error(kernels_cli.main, GEMM + ["--hardware", path], path, "clock_hz", '"value"')


@pytest.mark.parametrize("assignment, words", [
    ("routes_per_core=1e2", ["routes_per_core", "whole number"]),
    ("sram_bytes_per_core=1e40", ["sram_bytes_per_core", "whole number"]),
    ("sram_bytes_per_core=" + "9" * 40, ["sram_bytes_per_core", "too large"]),
    ("link_bytes_per_cycle=0", ["link_bytes_per_cycle", "positive"]),
])
def test_set_values_out_of_type_or_range(assignment, words):
    usage_error(kernels_cli.main, GEMM + ["--set", assignment], "--set", *words)


def test_every_good_profile_still_loads():
    for name in ("wse2", "wse3", *map(str, sorted(REPO.glob("results/**/wse2_calibrated*.json")))):
        assert load_hardware(name).clock_hz > 0


# ---------------------------------------------------------------------------- checkpoints
def model_dir(tmp_path, change: dict, drop=()) -> Path:
    directory = tmp_path / "model"
    directory.mkdir(exist_ok=True)
    config = {k: v for k, v in {**TINY_CONFIG, **change}.items() if k not in drop}
    (directory / "config.json").write_text(json.dumps(config))
    return directory


@pytest.mark.parametrize("change, drop, field", [
    ({"hidden_size": "128"}, ("head_dim",), "hidden_size"),
    ({"rms_norm_eps": "abc"}, (), "rms_norm_eps"),
    ({"eos_token_id": "x"}, (), "eos_token_id"),
    ({"rope_scaling": "abc"}, (), "rope_scaling"),
    ({"tie_word_embeddings": "no"}, (), "tie_word_embeddings"),
])
def test_config_fields_of_the_wrong_type(tmp_path, change, drop, field):
    directory = model_dir(tmp_path, change, drop)
    usage_error(llm_cli.main, ["generate", "--model", str(directory), "--dry-run", "--mesh", "2x2"],
                str(directory / "config.json"), field)


def test_prompt_longer_than_the_model_allows(tmp_path):
    directory = model_dir(tmp_path, {"max_position_embeddings": 4})
    usage_error(llm_cli.main, ["generate", "--model", str(directory), "--dry-run", "--mesh", "2x2",
                               "--prompt-len", "5"], "5 tokens", "max_position_embeddings (4)")


@pytest.mark.parametrize("dtype", ["F32", "BF16"])
def test_truncated_safetensors(tmp_path, dtype):
    tensors = small_tensors(SMALL)
    if dtype == "F32":
        write_model(tmp_path, SMALL, tensors)
    else:
        write_model(tmp_path, SMALL, {})
        write_bf16(tmp_path / "model.safetensors", tensors)
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if dtype == "F32" else data[:-100])
    usage_error(llm_cli.main, ["generate", "--model", str(tmp_path), "--prompt-ids", "1,2", "--mesh", "2x2"],
                str(weights), "truncated")


# ------------------------------------------------------------------------------- options
@pytest.mark.parametrize("extra, words", [
    (["--temperature", "nan"], ["--temperature", "nan"]),
    (["--temperature", "-1"], ["--temperature"]),
    (["--top-p", "0"], ["--top-p"]),
    (["--top-p", "5"], ["--top-p"]),
    (["--groups", "0"], ["--groups"]),
    (["--groups", "100"], ["--groups 100", "2x2"]),
    (["--layers", "0"], ["--layers"]),
    (["--layers", "9"], ["--layers", "1..4"]),
    (["--mesh", "2x6", "--prefill-mesh", "4x4"], ["--prefill-mesh 4x4", "--mesh 2x6", "hold"]),
    (["--check", "--dry-run"], ["--check", "--dry-run"]),
])
def test_generate_options(extra, words):
    usage_error(llm_cli.main, TINY + extra, *words)


@pytest.mark.parametrize("extra, words", [
    (["--groups", "0"], ["--groups"]),
    (["--groups", "100"], ["--groups 100", "4x4"]),
    (["--algo", "ring", "--groups", "2"], ["--groups", "ring"]),
])
def test_gemv_groups(extra, words):
    usage_error(kernels_cli.main, ["gemv", "--mesh", "4x4", "--m", "8", "--n", "8", *extra], *words)


def test_output_paths_are_checked_before_the_run(tmp_path, monkeypatch):
    ran = []
    monkeypatch.setattr("llm.generate._load_model", lambda args: ran.append(1))
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "old.h5").write_text("keep me")
    usage_error(llm_cli.main, TINY + ["--save-logits", str(folder)], "--save-logits", "folder")
    usage_error(llm_cli.main, TINY + ["--save-logits", "/proc/meshmpi-logits.npy"], "--save-logits", "/proc")
    usage_error(llm_cli.main, TINY + ["--trace", str(folder)], "--trace", "folder")
    usage_error(llm_cli.main, TINY + ["--trace", str(folder / "old.h5")], "exists", "--force")
    usage_error(kernels_cli.main, GEMM + ["--trace", str(folder / "old.h5")], "exists", "--force")
    usage_error(kernels_cli.main, GEMM + ["--trace", "/proc/meshmpi-trace.h5"], "--trace", "/proc")
    assert not ran, "the model was read before the outputs were checked"
    assert files_in(folder) == {"old.h5"} and (folder / "old.h5").read_text() == "keep me"


# ---------------------------------------------------------------------------- trace files
@pytest.fixture(scope="module")
def good_trace(tmp_path_factory):
    path = tmp_path_factory.mktemp("trace") / "good.h5"
    assert kernels_cli.main(GEMM + ["--trace", str(path), "--json"]) == 0
    return path


def damaged(good: Path, tmp_path: Path, change) -> Path:
    path = tmp_path / "damaged.h5"
    shutil.copy(good, path)
    with h5py.File(path, "a") as f:
        change(f)
    return path


@pytest.mark.parametrize("change, words", [
    (lambda f: f["meta"].attrs.__setitem__("hardware_json", "{broken"), ["hardware_json", "JSON"]),
    (lambda f: f["counters"].__delitem__("clock_cycles"), ["clock_cycles"]),
    (lambda f: f["meta"].attrs.__setitem__("hardware_json", f["meta"].attrs["hardware_json"].replace(
        '"value": 1100000000.0', '"value": 0')), ["clock_hz", "positive"]),
])
def test_damaged_traces(good_trace, tmp_path, change, words):
    path = damaged(good_trace, tmp_path, change)
    for command in (["trace", "summary"], ["trace", "compare", str(good_trace)],
                    ["trace", "export", "-o", str(tmp_path / "x.json")]):
        usage_error(meshmpi_cli.main, command + [str(path)], str(path), *words)
    assert files_in(tmp_path) == {"damaged.h5"}


def test_output_files_honour_the_umask_and_symlinks(good_trace, tmp_path):
    old = os.umask(0o022)
    try:
        assert meshmpi_cli.main(["trace", "export", str(good_trace), "-o", str(tmp_path / "a.json")]) == 0
        assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o644
        assert stat.S_IMODE(good_trace.stat().st_mode) == 0o644
        os.umask(0o077)
        real = tmp_path / "real" / "t.h5"
        real.parent.mkdir()
        real.write_text("old")
        (tmp_path / "link.h5").symlink_to(real)
        assert kernels_cli.main(GEMM + ["--trace", str(tmp_path / "link.h5"), "--force", "--json"]) == 0
        assert (tmp_path / "link.h5").is_symlink() and read_trace(real)["meta"]["kind"] == "gemm"
        assert stat.S_IMODE(real.stat().st_mode) == 0o600
        assert files_in(real.parent) == {"t.h5"}
    finally:
        os.umask(old)


def test_sigint_during_a_write_interrupts_and_leaves_nothing(tmp_path):
    def write(tmp):
        with h5py.File(tmp, "w") as f:
            f["a"] = np.arange(10)
            signal.raise_signal(signal.SIGINT)
            f["b"] = np.arange(10)

    # Python's own Ctrl-C handling, as in a terminal (a job started in the background by a
    # non-interactive shell inherits SIGINT ignored)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            outputs.write_atomic(tmp_path / "t.h5", write)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert files_in(tmp_path) == set()


def test_sigterm_during_a_write_leaves_nothing(tmp_path, run_env):
    script = textwrap.dedent(f"""
        import os, signal
        from meshmpi import outputs
        def write(tmp):
            open(tmp, "w").write("half")
            os.kill(os.getpid(), signal.SIGTERM)
        outputs.write_atomic({str(tmp_path / 't.h5')!r}, write)
        print("not reached")
    """)
    done = subprocess.run([sys.executable, "-c", script], env=run_env, capture_output=True, text=True, timeout=60)
    assert done.returncode == -signal.SIGTERM and "not reached" not in done.stdout, done
    assert files_in(tmp_path) == set()


def test_leftover_temporaries_are_named_and_skipped(good_trace, tmp_path, capsys):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    shutil.copy(good_trace, sweep / "good.h5")
    (sweep / "good.h5.a1b2c3d4.tmp").write_bytes(b"half a trace")
    (sweep / "garbage.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(64))
    data = np.frombuffer(good_trace.read_bytes(), np.uint8)
    rng = np.random.default_rng(0)
    for i in range(5):   # damaged in different places: every way h5py has to fail is one line
        copy = data.copy()
        copy[rng.integers(2048, len(data), 200)] = rng.integers(0, 256, 200)
        (sweep / f"broken{i}.h5").write_bytes(copy.tobytes())
    capsys.readouterr()
    assert meshmpi_cli.main(["results", "collect", str(sweep), "-o", str(tmp_path / "t.csv")]) == 0
    err = capsys.readouterr().err.splitlines()
    assert [line for line in err if "leftover temporary file" in line] == [
        f"collect: note: ignoring 1 leftover temporary file of an interrupted write under {sweep}: "
        "good.h5.a1b2c3d4.tmp"]
    assert any(line.startswith(f"collect: skipping {sweep / 'garbage.h5'}:") for line in err), err
    assert "Traceback" not in "\n".join(err)
    assert "good.h5," in (tmp_path / "t.csv").read_text()
    usage_error(meshmpi_cli.main, ["results", "collect", str(sweep), "-o", "/proc/meshmpi.csv"], "-o", "/proc")
    usage_error(meshmpi_cli.main, ["results", "collect", str(sweep), "-o", str(sweep)], "-o", "folder")
    assert meshmpi_cli.main(["trace", "summary", str(sweep / "good.h5")]) == 0
    assert "ignoring 1 leftover temporary file" in capsys.readouterr().err
    usage_error(meshmpi_cli.main, ["trace", "summary", str(sweep / "good.h5.a1b2c3d4.tmp")], "leftover temporary")


# ----------------------------------------------------------------------- reports and words
def test_warn_runs_print_one_line_and_keep_the_list(tmp_path, capsys):
    argv = ["gemm", "--algo", "summa", "--broadcast", "direct", "--mesh", "32x32", "--m", "4096", "--k", "4096",
            "--n", "4096", "--dry-run", "--memory", "warn", "--routes", "warn", "--json",
            "--trace", str(tmp_path / "w.h5")]
    capsys.readouterr()
    assert kernels_cli.main(argv) == 0
    out, err = capsys.readouterr()
    report = json.loads(out)
    assert len(report["warnings"]) > 10
    assert [line for line in err.splitlines() if line.startswith("warning")] == [err.strip()]
    assert f"{len(report['warnings'])} limits exceeded" in err and report["warnings"][0] in err
    assert read_trace(tmp_path / "w.h5")["meta"]["warnings"] == report["warnings"]


def test_compare_json_labels_seconds_as_seconds(good_trace, capsys):
    capsys.readouterr()
    assert meshmpi_cli.main(["trace", "compare", str(good_trace), str(good_trace), "--json"]) == 0
    row = next(t for t in json.loads(capsys.readouterr().out)["totals"] if t["metric"] == "modeled_seconds")
    assert row["label"] == "modeled time (s)"
    assert row["values"][0] == pytest.approx(summarize(read_trace(good_trace))["totals"]["modeled_seconds"])


def test_one_rank_an_eight_by_eight_mesh(good_trace):
    summary = summarize(read_trace(good_trace))
    summary["totals"].update(mesh="8x8", ranks=1)
    assert format_summary(summary).splitlines()[0] == "gemm on an 8x8 mesh (wse2, 1 rank)"


def test_version_on_the_three_commands(capsys):
    from meshmpi import __version__
    for main in (meshmpi_cli.main, kernels_cli.main, llm_cli.main):
        with pytest.raises(SystemExit) as info:
            main(["--version"])
        assert info.value.code == 0 and capsys.readouterr().out.strip().endswith(f"(meshmpi {__version__})")


# ----------------------------------------------------------------- the exit path, launched
def test_errors_end_every_rank_with_one_line(tmp_path, run_env, python_exe, mpiexec_exe):
    profile = profile_with(tmp_path, "clock_hz", 0)
    cases = [
        ([python_exe, "-m", "kernels", *GEMM, "--hardware", profile], "clock_hz"),
        ([mpiexec_exe, "-n", "2", python_exe, "-m", "kernels", *GEMM, "--hardware", profile], "clock_hz"),
        ([mpiexec_exe, "-n", "2", python_exe, "-m", "llm", "generate", "--model", "tiny", "--mesh", "1x8",
          "--save-logits", str(tmp_path / "l.npy")], "cannot be laid over a 1x1 mesh, the prefill region"),
    ]
    for command, words in cases:
        done = subprocess.run(command, env=run_env, capture_output=True, text=True, timeout=120)
        output = done.stdout + done.stderr
        errors = [line for line in output.splitlines() if line.startswith("error")]
        assert done.returncode == 2 and len(errors) == 1 and words in errors[0], output
        assert "Traceback" not in output
    assert files_in(tmp_path) == {"profile.json"}
