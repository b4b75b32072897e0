"""Prefill with the GEMMs of the systems WaferLLM is compared with (llm/strategies/prefill.py,
PAPER.md §8): logits and K/V caches against the numpy reference, dry runs and rank splits
against numeric runs, and the gap of each strategy's GEMMs to MeshGEMM's in the modeled time."""
import numpy as np
import pytest
from mpi4py import MPI

from llm.checkpoint import random_weights
from llm.config import LlamaConfig
from llm.prefill import PrefillLayout, prefill
from llm.reference import ReferenceModel
from llm.strategies import STRATEGIES, prefill_runner
from meshmpi import Mesh, load_hardware

pytestmark = pytest.mark.mpi

MHA = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, vocab_size=64, head_dim=8, rms_norm_eps=1e-5)
GQA = LlamaConfig(hidden_size=60, intermediate_size=100, num_hidden_layers=2, num_attention_heads=6,
                  num_key_value_heads=2, vocab_size=128, head_dim=10, rope_theta=500000.0)
COMPARED = [s for s in STRATEGIES if s != "waferllm"]


def _ids(config, length):
    return np.random.default_rng(3).integers(0, config.vocab_size, length)


def _run(strategy, config, n, length, comm=None, dry_run=False):
    weights = None if dry_run else random_weights(config, 1)
    mesh = Mesh(n, n, load_hardware("wse2"), comm=comm, dry_run=dry_run, routes="strict")
    try:
        result = prefill(mesh, config, weights, length if dry_run else _ids(config, length),
                         runner=prefill_runner(strategy))
        leftover = (sorted(mesh.memory.buffers), sorted(mesh.routes.groups))
    finally:
        mesh.free()
    return result, weights, leftover


@pytest.mark.parametrize("strategy", COMPARED)
@pytest.mark.parametrize("config,n,length", [(MHA, 2, 5), (GQA, 4, 7), (GQA, 3, 4)], ids=["mha-2", "gqa-4", "gqa-3"])
def test_strategy_prefill_matches_reference(strategy, config, n, length):
    result, weights, leftover = _run(strategy, config, n, length)
    ref = ReferenceModel(config, weights)
    logits = ref.prefill(_ids(config, length))
    np.testing.assert_allclose(result.last_hidden @ weights.lm_head, logits[-1], atol=1e-4, rtol=0)
    for mine_k, mine_v, ref_k, ref_v in zip(result.k_cache, result.v_cache, ref.k_cache, ref.v_cache):
        np.testing.assert_allclose(mine_k, ref_k, atol=1e-5, rtol=0)
        np.testing.assert_allclose(mine_v, ref_v, atol=1e-5, rtol=0)
    assert leftover == ([], []), "every buffer and route is released at the end"


@pytest.mark.parametrize("strategy", COMPARED)
def test_strategy_prefill_dry_and_rank_invariant(strategy):
    numeric, _, _ = _run(strategy, GQA, 4, 7)
    dry, _, _ = _run(strategy, GQA, 4, 7, dry_run=True)
    single, _, _ = _run(strategy, GQA, 4, 7, comm=MPI.COMM_SELF, dry_run=True)
    for other in (dry, single):
        assert (other.modeled_cycles, other.cycles_per_layer, other.flops_charged) == (
            numeric.modeled_cycles, numeric.cycles_per_layer, numeric.flops_charged)
    assert len(set(MPI.COMM_WORLD.allgather(numeric.modeled_cycles))) == 1


def _charged_gemm_flops(strategy, m, n, tokens, row_parallel, side=4):
    """Closed form of a strategy's GEMM charge on a side² mesh: the used cores (whole rows, 1-D
    over the output columns, or the input rows for Megatron-LM's row-parallel GEMMs) each do
    ``2 T x (its K rows) x (its w columns)``; Ladder's K rows are every holder's h."""
    if row_parallel:
        m, n = n, m
    used = min(side, -(-n // side)) * side
    width = -(-n // used)
    k_rows = m
    if strategy == "ladder":
        h = -(-m // used)
        k_rows = h * -(-(-(-m // h)) // side) * side
    return 2 * tokens * k_rows * width * used


def test_strategy_prefill_charges_waferllm_outside_the_weight_gemms():
    """The strategies replace only the four weight GEMMs: what the mesh charges is WaferLLM's
    charge without its four MeshGEMMs plus the closed form of the strategy's (at this size
    T10 needs no rotation: one chunk, Megatron-LM's column-parallel charge)."""
    t, layers = 7, GQA.num_hidden_layers
    base, _, _ = _run("waferllm", GQA, 4, t, dry_run=True)
    work = PrefillLayout(GQA, 4, t).work()
    shared = base.flops_charged - layers * sum(work[op].total() for op in ("qkv", "o", "gate_up", "down"))
    h, f = GQA.hidden_size, GQA.intermediate_size
    q, kv = GQA.num_attention_heads * GQA.head_dim, GQA.num_key_value_heads * GQA.head_dim
    shapes = {"qkv": (h, q + 2 * kv), "o": (q, h), "gate_up": (h, 2 * f), "down": (f, h)}
    for strategy in COMPARED:
        mine, _, _ = _run(strategy, GQA, 4, t, dry_run=True)
        gemms = sum(_charged_gemm_flops(strategy, m, n, t, strategy == "megatron" and op in ("o", "down"))
                    for op, (m, n) in shapes.items())
        assert mine.flops_charged == shared + layers * gemms
        assert mine.flops_real == base.flops_real
