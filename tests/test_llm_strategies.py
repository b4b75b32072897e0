"""Decode with the systems WaferLLM is compared with (llm/strategies, PAPER.md §8): tokens and
logits against the numpy reference, closed forms of the collectives each strategy adds, strict
route limits, dry runs and rank splits against numeric runs."""
import subprocess

import numpy as np
import pytest
from mpi4py import MPI

from llm.checkpoint import random_weights
from llm.config import LlamaConfig
from llm.reference import ReferenceModel
from llm.strategies import STRATEGIES, decoder_class
from llm.strategies.base import bind
from llm.strategies.ladder import Ladder
from llm.strategies.megatron import row_parallel
from llm.strategies.t10 import T10
from meshes import fits
from meshmpi import Mesh, load_hardware
from meshmpi.errors import RoutingError

pytestmark = pytest.mark.mpi

HW = load_hardware("wse2")
CONFIG = dict(hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6,
              num_key_value_heads=2, vocab_size=70, head_dim=8)
PROMPT = (3, 5, 7, 11, 2)


def _decoder(strategy, rows, cols, weights, comm=MPI.COMM_WORLD, dry_run=False, cls=None, routes="strict"):
    config = LlamaConfig(**CONFIG)
    # the strategies duplicate x (and Ladder the fetched W) beside WaferLLM's resident plan
    mesh = Mesh(rows, cols, HW, comm=comm, dry_run=dry_run, memory="warn", routes=routes)
    return (cls or decoder_class(strategy))(mesh, config, weights, capacity_tokens=len(PROMPT) + 4), mesh


def _steps(decoder, weights, steps=3):
    """Decode ``steps`` tokens after the prompt (greedy on the reference's logits); returns
    [(logits, StepCycles)]."""
    ref = ReferenceModel(decoder.config, weights)
    last = ref.prefill(list(PROMPT))[-1]
    decoder.load_prompt_cache(ref.k_cache, ref.v_cache, len(PROMPT))
    token, out = int(np.argmax(last)), []
    for position in range(len(PROMPT), len(PROMPT) + steps):
        want = ref.decode(token)
        got, cycles = decoder.step(weights.embed[token], position)
        out.append((got, want, cycles))
        token = int(np.argmax(want))
    return out


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("grid", [(2, 2), (3, 4), (4, 2)])
def test_strategies_decode_the_reference_tokens(strategy, grid):
    if not fits(*grid):
        pytest.skip("mesh smaller than the rank grid")
    weights = random_weights(LlamaConfig(**CONFIG), seed=4)
    decoder, mesh = _decoder(strategy, *grid, weights)
    for got, want, _ in _steps(decoder, weights):
        assert int(np.argmax(got)) == int(np.argmax(want))
        assert np.abs(got - want).max() < 1e-4
    mesh.free()


@pytest.mark.parametrize("strategy", STRATEGIES[1:])
def test_dry_runs_and_rank_splits_model_the_same_cycles(strategy):
    """The same step's cycles, numeric on the world's ranks, numeric on one rank, and dry."""
    weights = random_weights(LlamaConfig(**CONFIG), seed=4)
    cycles = []
    for comm, dry_run in ((MPI.COMM_WORLD, False), (MPI.COMM_SELF, False), (MPI.COMM_WORLD, True)):
        decoder, mesh = _decoder(strategy, 4, 4, None if dry_run else weights, comm, dry_run)
        if dry_run:
            decoder.load_prompt_cache(None, None, len(PROMPT))
            step = [decoder.step(None, len(PROMPT))[1]]
        else:
            step = [c for _, _, c in _steps(decoder, weights, steps=1)]
        cycles.append((step[0].kv_shift, step[0].layers, step[0].head, mesh.modeled_cycles()))
        mesh.free()
    assert cycles[1] == cycles[0] and cycles[2] == cycles[0]
    assert all(c == cycles[0] for c in MPI.COMM_WORLD.allgather(cycles[0]))


def test_strategies_differ_from_waferllm_and_each_other():
    """The hook really replaces the GEMVs: four different step times on one mesh."""
    config = LlamaConfig(**CONFIG)
    times = {}
    for strategy in STRATEGIES:
        decoder, mesh = _decoder(strategy, 4, 4, None, dry_run=True)
        decoder.load_prompt_cache(None, None, len(PROMPT))
        times[strategy] = decoder.step(None, len(PROMPT))[1].total(config.num_hidden_layers)
        mesh.free()
    assert len(set(times.values())) == len(STRATEGIES)


@pytest.mark.parametrize("rows,cols,m,n", [(3, 4, 23, 40), (4, 5, 50, 16), (2, 6, 7, 30), (3, 6, 5, 9)])
def test_megatron_row_parallel_closed_form(rows, cols, m, n):
    """W's rows over the snake of ceil(m / cols) rows of cores (w = ceil(m / used) each): a
    local GEMV of w·n multiply-adds (min(w, n) vector operations), then the reduce chain up the
    snake: (used - 1)·(α + β), the n-element payload once; one 1-hop message into every used
    core but the first, cols - 2 relays on each used row; 2 routes for the row chains, 1 more for
    the turns when there are several rows."""
    used_rows = min(rows, -(-m // cols))
    used = used_rows * cols
    width = -(-m // used)
    a, b, bw = HW.alpha_cycles_per_hop, HW.beta_cycles_per_relay, HW.link_bytes_per_cycle
    compute = 2 * width * n / HW.flops_per_cycle + min(width, n) * HW.vector_op_cycles
    expected = compute + (used - 1) * (a + b) + n * HW.element_bytes / bw
    rng = np.random.default_rng(rows)
    x, w = rng.standard_normal(m).astype(np.float32), rng.standard_normal((m, n)).astype(np.float32)
    for dry_run in (False, True):
        mesh = Mesh(rows, cols, HW, comm=MPI.COMM_WORLD if fits(rows, cols) else MPI.COMM_SELF, dry_run=dry_run)
        y = row_parallel(mesh, m, n, None if dry_run else x, None if dry_run else w, "rp")
        assert mesh.modeled_cycles() == pytest.approx(expected)
        assert mesh.sum_over_ranks(int(mesh.counters["relays"].sum())) == used_rows * (cols - 2)
        assert mesh.sum_over_ranks(int(mesh.counters["messages_sent"].sum())) == used - 1
        assert mesh.max_over_ranks(mesh.max_hops) == cols - 1
        # the relayed row chain's send and receive colours, and the 1-hop turn between rows
        assert mesh.max_over_ranks(int(mesh.routes.peak.max())) == 2 + (used_rows > 1)
        if not dry_run:
            assert np.abs(y - x @ w).max() < 1e-4
        mesh.free()


@pytest.mark.parametrize("rows,cols,m,n", [(3, 4, 23, 40), (4, 5, 50, 16), (5, 3, 9, 14), (4, 6, 10, 5)])
def test_t10_hand_over_closed_form(rows, cols, m, n):
    """x whole fits beside a core's columns, so T10's ring is 1 and nothing rotates: the GEMV is
    the hand-over, one multicast down column 0 over the used rows (ceil(n / cols)) and then one
    along each used row on pass-through routes (each: a start, α a hop, the m-element payload
    once; no relays, a route per axis it covers), then the local GEMV of m·w multiply-adds."""
    used_rows = min(rows, -(-n // cols))
    used = used_rows * cols
    width = -(-n // used)
    a, bw, start = HW.alpha_cycles_per_hop, HW.link_bytes_per_cycle, HW.transfer_start_cycles
    compute = 2 * m * width / HW.flops_per_cycle + min(m, width) * HW.vector_op_cycles
    legs = [hops for hops in (used_rows - 1, cols - 1) if hops]
    expected = sum(start + a * hops + m * HW.element_bytes / bw for hops in legs) + compute
    rng = np.random.default_rng(cols)
    x, w = rng.standard_normal(m).astype(np.float32), rng.standard_normal((m, n)).astype(np.float32)
    mesh = Mesh(rows, cols, HW, comm=MPI.COMM_WORLD if fits(rows, cols) else MPI.COMM_SELF, routes="strict")
    y = T10().gemv(mesh, "qkv", m, n, x, w, "t10")
    assert np.abs(y - x @ w).max() < 1e-4
    assert mesh.modeled_cycles() == pytest.approx(expected)
    assert mesh.sum_over_ranks(int(mesh.counters["relays"].sum())) == 0
    assert mesh.max_over_ranks(mesh.max_hops) == max(used_rows - 1, cols - 1)
    # one route at each position along each axis a multicast covers (meshmpi/routes.py)
    assert mesh.max_over_ranks(int(mesh.routes.peak.max())) == (used_rows > 1) + (cols > 1)
    mesh.free()


def test_ladder_direct_routes_raise_in_decode_and_relays_fit():
    """Ladder's long-range fetches as pass-through routes need O(cols) routes per router: over
    the profile's limit on 6x6, strict routes raise; the relay fallback decodes."""
    decoder, mesh = _decoder("ladder", 6, 6, None, dry_run=True, cls=bind(Ladder("direct")))
    decoder.load_prompt_cache(None, None, len(PROMPT))
    with pytest.raises(RoutingError):
        decoder.step(None, len(PROMPT))
    mesh.free()
    decoder, mesh = _decoder("ladder", 6, 6, None, dry_run=True)
    decoder.load_prompt_cache(None, None, len(PROMPT))
    decoder.step(None, len(PROMPT))
    assert mesh.max_over_ranks(int(mesh.routes.peak.max())) <= HW.routes_per_core
    mesh.free()


def test_unknown_strategies_are_one_usage_error(run_env, python_exe):
    import llm.__main__ as llm_cli
    from meshmpi import UsageError
    with pytest.raises(UsageError, match="--strategies takes waferllm, megatron, ladder, t10"):
        llm_cli.main(["bench", "--strategies", "waferllm,gpu", "--models", "llama3-8b", "--out", "/nonexistent"])
    done = subprocess.run([python_exe, "-m", "llm", "generate", "--model", "tiny", "--strategy", "gpu"],
                          capture_output=True, text=True, timeout=120, env=run_env)
    assert done.returncode == 2
    assert [line for line in done.stderr.splitlines() if line.startswith("error:")] == [
        "error: python -m llm generate: argument --strategy: invalid choice: 'gpu' "
        "(choose from 'waferllm', 'megatron', 'ladder', 't10')"]
