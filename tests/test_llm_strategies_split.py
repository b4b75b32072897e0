"""Where the strategies' cycles go (llm/strategies/bench.py ``split``): the run repeated with parts
of the cost model off gives compute, hops, relays and the rest, against closed forms on small
meshes, and the prefill's parts add up to its whole on every world size."""
import numpy as np
import pytest
from mpi4py import MPI

from llm.strategies.bench import prefill_columns, split
from llm.strategies.megatron import row_parallel
from llm.strategies.t10 import T10
from meshes import fits
from meshmpi import Mesh, load_hardware

pytestmark = pytest.mark.mpi

HW = load_hardware("wse2")
FREE_BW = 1e9          # the free network's link bytes per cycle


def _cycles(rows, cols, gemv):
    def measure(hw):
        mesh = Mesh(rows, cols, hw, comm=MPI.COMM_WORLD if fits(rows, cols) else MPI.COMM_SELF,
                    dry_run=True, routes="strict")
        gemv(mesh)
        cycles = mesh.modeled_cycles()
        mesh.free()
        return {"cycles": cycles}
    return measure


@pytest.mark.parametrize("rows,cols,m,n", [(3, 4, 23, 40), (4, 5, 50, 16)])
def test_megatron_reduce_splits_into_its_closed_form(rows, cols, m, n):
    """Row-parallel: the local GEMV (compute), then the reduce chain's (used − 1) stages of α
    (hops) and β (relays), the n-element payload once (other; with free links it is n·2/10⁹,
    which lands in compute)."""
    used = min(rows, -(-m // cols)) * cols
    width = -(-m // used)
    payload = n * HW.element_bytes
    compute = 2 * width * n / HW.flops_per_cycle + min(width, n) * HW.vector_op_cycles
    base, parts = split(_cycles(rows, cols, lambda mesh: row_parallel(mesh, m, n, None, None, "rp")), HW, "cycles")
    assert parts["compute_cycles"] == pytest.approx(compute + payload / FREE_BW)
    assert parts["hop_cycles"] == pytest.approx((used - 1) * HW.alpha_cycles_per_hop)
    assert parts["relay_cycles"] == pytest.approx((used - 1) * HW.beta_cycles_per_relay)
    assert parts["other_cycles"] == pytest.approx(payload / HW.link_bytes_per_cycle - payload / FREE_BW)
    assert sum(parts.values()) == pytest.approx(base["cycles"])


@pytest.mark.parametrize("rows,cols,m,n", [(3, 4, 23, 40), (5, 3, 9, 14)])
def test_t10_hand_over_splits_into_its_closed_form(rows, cols, m, n):
    """T10 at ring 1: two multicast legs (down the used rows, along the rows), each a transfer
    start (other), α a hop (hops) and the m-element payload (other; free: in compute), no relays,
    then the local GEMV (compute)."""
    used_rows = min(rows, -(-n // cols))
    width = -(-n // (used_rows * cols))
    legs = [hops for hops in (used_rows - 1, cols - 1) if hops]
    payload = m * HW.element_bytes
    compute = 2 * m * width / HW.flops_per_cycle + min(m, width) * HW.vector_op_cycles
    base, parts = split(_cycles(rows, cols, lambda mesh: T10().gemv(mesh, "qkv", m, n, None, None, "t10")),
                        HW, "cycles")
    assert parts["compute_cycles"] == pytest.approx(compute + len(legs) * payload / FREE_BW)
    assert parts["hop_cycles"] == pytest.approx(sum(legs) * HW.alpha_cycles_per_hop)
    assert parts["relay_cycles"] == 0
    assert parts["other_cycles"] == pytest.approx(
        len(legs) * (HW.transfer_start_cycles + payload / HW.link_bytes_per_cycle - payload / FREE_BW))
    assert sum(parts.values()) == pytest.approx(base["cycles"])


@pytest.mark.parametrize("strategy", ["waferllm", "megatron", "ladder", "t10"])
def test_prefill_parts_add_up_to_the_whole_on_every_world_size(strategy):
    """A short llama3-8b prefill on 24²: the four parts add up to the prefill's cycles, none is
    negative beyond rounding, and every rank reports the same split."""
    cols = prefill_columns("llama3-8b", 24, strategy, HW, 6)
    total = cols["prefill_cycles"]
    parts = [cols[f"prefill_{part}_cycles"] for part in ("compute", "hop", "relay", "other")]
    assert sum(parts) == pytest.approx(total, rel=1e-12)
    assert min(parts) > -1e-6 * total and cols["prefill_compute_cycles"] > 0
    assert cols["prefill_hop_cycles"] > 0
    assert cols["prefill_hops"] >= cols["prefill_messages"] > 0      # every message crosses a link
    assert cols["prefill_fits_sram"] == (cols["prefill_peak_bytes_per_core"] <= HW.sram_bytes_per_core)
    same = [cols[k] for k in sorted(cols) if k != "prefill_wall_seconds"]
    assert all(np.array_equal(s, same) for s in MPI.COMM_WORLD.allgather(same))
