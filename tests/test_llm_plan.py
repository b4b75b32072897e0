"""``llm plan`` says what ``generate`` then does, and a mesh too small says what would fit."""
import pytest

from llm.generate import build_parser, run_generate
from llm.plan import run_plan
from meshes import fits
from meshmpi import CoreMemoryError, UsageError

pytestmark = pytest.mark.mpi
CONTEXT = ("--prompt-len", "8", "--max-new-tokens", "8")
SAME = ("regions", "layers_per_region", "last_region_layers", "cores_used", "kv_capacity_tokens",
        "kv_capacity_by_policy")


def plan(*argv):
    return run_plan(build_parser().parse_args(["plan", "--model", "tiny", *CONTEXT, *argv]))


def dry_generate(mesh, *argv):
    return run_generate(build_parser().parse_args(
        ["generate", "--model", "tiny", "--dry-run", *CONTEXT, "--ignore-eos", "--mesh", mesh, "--json", *argv]))


@pytest.mark.parametrize("kv", ["shift", "concat"])
@pytest.mark.parametrize("mesh", ["4x4", "5x8"])
def test_plan_matches_what_generate_does(mesh, kv):
    if not fits(4, 4):
        pytest.skip("mesh smaller than the rank grid")
    planned = plan("--mesh", mesh, "--kv", kv)["mesh"]
    assert planned["fits"], planned["reason"]
    done = dry_generate(mesh, "--kv", kv)
    assert {k: planned[k] for k in SAME} == {k: done[k] for k in SAME}
    assert planned["decode_peak_bytes_per_core"] <= done["peak_bytes_per_core"] <= 49152


def test_the_smallest_mesh_is_the_smallest_that_runs():
    report = plan()
    best, single = report["smallest_mesh"], report["smallest_single_region_mesh"]
    n = int(best["mesh"].split("x")[0])
    assert best["fits"] and single["regions"] == 1 and int(single["mesh"].split("x")[0]) >= n
    if not fits(n - 1, n - 1):
        pytest.skip("the mesh below the smallest is smaller than the rank grid")
    assert dry_generate(f"{n}x{n}")["regions"] == best["regions"]
    with pytest.raises((CoreMemoryError, UsageError)) as err:
        dry_generate(f"{n - 1}x{n - 1}")
    message = str(err.value)
    assert f"the smallest square mesh for this model and a 16-token context (KV shift) is --mesh {n}x{n}" in message
    assert "\n" not in message
    assert not plan("--mesh", f"{n - 1}x{n - 1}")["mesh"]["fits"]


def test_a_model_too_big_for_the_wafer_says_so():
    with pytest.raises((CoreMemoryError, UsageError), match=r"no square region of the wse2 wafer \(up to 3x3\)"):
        dry_generate("2x2", "--set", "mesh_rows=3", "--set", "mesh_cols=3")
