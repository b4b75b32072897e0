"""Energy (PAPER.md §9): joules equal the closed forms over events counted by hand, at every
world size; the calibration reproduces the public figure it was taken from."""
from __future__ import annotations

import json

import numpy as np
import pytest
from mpi4py import MPI

from kernels.run import run_gemm
from meshmpi import Mesh, UsageError, energy, load_hardware
from meshmpi.host import gather_block_arrays
from meshes import make_mesh

HW = load_hardware("wse2")
ROWS, COLS, TILE, FLOPS = 4, 6, 7, 30


def hand_schedule(mesh):
    """A shift by +2 along x of a TILE-element tile, a multicast from row 1 down every column,
    then FLOPS on every core."""
    tile = mesh.alloc("tile", (TILE,), np.float32)
    with mesh.fabric.scope():
        mesh.fabric.shift("east2", "x", 2).run(tile)
        mesh.fabric.multicast("down", "y", 1).run(tile)
    mesh.compute(FLOPS)
    tile.free()


def hand_events():
    """Per-core events of :func:`hand_schedule`, walked message by message."""
    nbytes = TILE * HW.element_bytes
    e = {k: np.zeros((ROWS, COLS)) for k in energy.EVENTS}
    for r in range(ROWS):
        for s in range(COLS - 2):               # the shift: 2 links each
            e["bytes_sent"][r, s] += nbytes
            e["bytes_recv"][r, s + 2] += nbytes
            e["byte_hops"][r, s] += 2 * nbytes
    for c in range(COLS):                        # the multicast: one message over rows 0..3
        e["bytes_sent"][1, c] += nbytes
        e["byte_hops"][1, c] += (ROWS - 1) * nbytes
        for r in (0, 2, 3):
            e["bytes_recv"][r, c] += nbytes
    e["flops"][:] = FLOPS
    return e


def closed_form_joules(e, seconds):
    """Each part by hand, in pJ: fp16 FLOPs; SRAM reads 3 bytes per FLOP plus bytes sent, writes
    1 byte per FLOP plus bytes received (2-byte elements); bytes x hops; static over ``seconds``."""
    return {"compute": e["flops"] * 0.1857e-12,
            "sram": ((3 * e["flops"] + e["bytes_sent"]) * 0.3094e-12
                     + (e["flops"] + e["bytes_recv"]) * 0.3094e-12),
            "fabric": e["byte_hops"] * 0.8e-12,
            "static": np.full((ROWS, COLS), 0.004353 * seconds)}


@pytest.mark.mpi
@pytest.mark.parametrize("dry_run", [False, True])
def test_joules_equal_closed_forms_over_hand_counted_events(dry_run):
    mesh = make_mesh(ROWS, COLS, dry_run=dry_run)
    hand_schedule(mesh)
    seconds = HW.cycles_to_seconds(mesh.modeled_cycles())
    expected = closed_form_joules(hand_events(), seconds)
    per_core = gather_block_arrays(mesh, {"joules": energy.per_core(mesh, seconds)})
    report = energy.run_summary(mesh)
    mesh.free()
    assert report["energy_split_joules"] == pytest.approx({k: float(v.sum()) for k, v in expected.items()},
                                                          rel=1e-12)
    assert report["energy_joules"] == pytest.approx(sum(float(v.sum()) for v in expected.values()), rel=1e-12)
    assert report["average_watts"] == pytest.approx(report["energy_joules"] / seconds, rel=1e-12)
    if per_core is not None:
        np.testing.assert_allclose(per_core["joules"], sum(expected.values()), rtol=1e-12)
    gathered = MPI.COMM_WORLD.allgather(report)
    assert all(g == report for g in gathered)


@pytest.mark.mpi
def test_meshgemm_energy_is_rank_invariant_and_counts_2mkn_flops():
    """MeshGEMM on 4x4 with m, k, n divisible: 2*m*k*n FLOPs; the same joules on this
    world as on one rank."""
    m, k, n = 16, 8, 12
    reports = []
    for mesh in (make_mesh(4, 4), Mesh(4, 4, HW, comm=MPI.COMM_SELF)):
        reports.append(run_gemm(mesh, "meshgemm", m, k, n))
        mesh.free()
    world, alone = reports
    assert world["energy_split_joules"]["compute"] == pytest.approx(2 * m * k * n * 0.1857e-12, rel=1e-12)
    for key in ("energy_joules", "energy_split_joules", "average_watts"):
        assert world[key] == alone[key]


def test_full_load_power_is_the_public_figure():
    """The calibration: every one of WSE-2's 850,000 cores at its FLOP rate draws 37 x 400 W
    (PAPER.md §9: 37x the power of one A100; the A100 SXM's 400 W TDP)."""
    cycle_flops = HW.flops_per_cycle * HW.clock_hz          # FLOPs per second of one core
    events = {"flops": cycle_flops, "bytes_sent": 0, "bytes_recv": 0, "byte_hops": 0}
    watts = energy.joules(HW, events, 1.0)["total"] * 850_000
    assert watts == pytest.approx(37 * 400, rel=2e-3)


def test_a_profile_without_energy_constants_reports_none(tmp_path):
    doc = json.loads(HW.to_json())
    for key in ("pj_per_flop_fp16", "static_watts_per_core"):
        del doc[key]
    path = tmp_path / "old.json"
    path.write_text(json.dumps(doc))
    hw = load_hardware(str(path))
    assert not hw.has_energy and hw.pj_per_flop_fp32 == HW.pj_per_flop_fp32
    with pytest.raises(UsageError, match="pj_per_flop_fp16, static_watts_per_core"):
        energy.require(hw)


def test_sram_suffixes_parse():
    assert load_hardware("wse2", ["sram_bytes_per_core=96K"]).sram_bytes_per_core == 96 * 1024
    assert load_hardware("wse2", ["sram_bytes_per_core=1m"]).sram_bytes_per_core == 2 ** 20
    with pytest.raises(UsageError):
        load_hardware("wse2", ["sram_bytes_per_core=96Q"])


@pytest.mark.mpi
def test_generate_reports_energy_per_token_with_the_static_closed_form():
    """Decode's static joules per token are static W x every decode region's cores x the modeled
    seconds per token; the parts add up; a numeric and a dry run agree on every rank."""
    from llm.generate import build_parser, run_generate
    from meshes import fits
    if not fits(4, 5) or not fits(4, 4):
        pytest.skip("mesh smaller than the rank grid")
    common = ["generate", "--model", "tiny", "--max-new-tokens", "4", "--mesh", "4x5", "--layers", "all"]
    # every layer run, so that the dry run's numbers are the numeric run's to the bit
    dry = run_generate(build_parser().parse_args(common + ["--dry-run", "--prompt-len", "5", "--run-every-layer"]))
    numeric = run_generate(build_parser().parse_args(common + ["--prompt-ids", "1,2,3,4,5"]))
    assert numeric["new_tokens"] == dry["new_tokens"] == 4
    decode = dry["energy_decode_split_joules_per_token"]
    seconds = dry["modeled_decode_cycles_per_token"] / HW.clock_hz
    assert decode["static"] == pytest.approx(HW.static_watts_per_core * dry["cores_used"] * seconds, rel=1e-12)
    assert sum(decode.values()) == pytest.approx(dry["energy_decode_joules_per_token"], rel=1e-12)
    assert min(decode.values()) > 0
    assert sum(dry["energy_split_joules"].values()) == pytest.approx(dry["energy_joules"], rel=1e-12)
    assert dry["energy_joules_per_token"] == pytest.approx(dry["energy_joules"] / 4, rel=1e-12)
    assert dry["energy_joules"] > dry["energy_prefill_joules"] + 3 * dry["energy_decode_joules_per_token"]
    for key in ("energy_joules", "energy_split_joules", "energy_prefill_joules", "energy_decode_split_joules_per_token"):
        assert numeric[key] == dry[key], key
    assert all(g == dry["energy_joules"] for g in MPI.COMM_WORLD.allgather(dry["energy_joules"]))
