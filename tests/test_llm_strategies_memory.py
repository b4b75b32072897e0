"""The compared strategies' resident weights on the memory ledger (llm/strategies, PAPER.md §8:
M): each core is charged the shares its 1-D partition places on it, for decode and prefill,
against closed forms worked out from the partitions' definitions on a small mesh."""
import numpy as np
import pytest
from mpi4py import MPI

from llm.config import LlamaConfig
from llm.prefill import prefill
from llm.strategies import decoder_class, prefill_runner
from meshmpi import Mesh, load_hardware

pytestmark = pytest.mark.mpi

HW = load_hardware("wse2")
CONFIG = LlamaConfig(hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6,
                     num_key_value_heads=2, vocab_size=70, head_dim=8)
# y = x @ W, (m, n) of each matrix: q|k|v (48 + 2·16 outputs), W_O, gate|up, W_down, the LM head
SHAPES = {"qkv": (48, 80), "o": (48, 48), "gate_up": (48, 160), "down": (80, 48), "lm_head": (48, 70)}
SIDE = 8      # a mesh where the partitions leave rows of cores idle for some matrices


def cdiv(a, b):
    return -(-a // b)


def share(strategy, kind, m, n):
    """Closed form: W's elements on each core of the SIDE x SIDE mesh. The used region is the
    first ceil(outputs / SIDE) rows; w = ceil(outputs / used cores) columns each (Megatron-LM's
    row-parallel W_O and W_down partition their inputs alike, holding n·w). Ladder keeps W in
    row-major order over the cores of that used region: h = ceil(m / used) rows of n_pad each on
    the first ceil(m / h) cores. T10's ring is 1 at these sizes (x fits), so each used core
    holds all m rows of its w columns."""
    if strategy == "megatron" and kind in ("o", "down"):
        m, n = n, m
    used_rows = min(SIDE, cdiv(n, SIDE))
    used = used_rows * SIDE
    width = cdiv(n, used)
    rows = np.arange(SIDE)[:, None] + np.zeros((1, SIDE), int)
    if strategy == "ladder":
        h = cdiv(m, used)
        ids = rows * SIDE + np.arange(SIDE)[None, :]
        return np.where(ids < cdiv(m, h), h * width * used, 0)
    return np.where(rows < used_rows, m * width, 0)


def block(mesh, full):
    return full[mesh.row_start:mesh.row_stop, mesh.col_start:mesh.col_stop]


@pytest.mark.parametrize("strategy", ["megatron", "ladder", "t10"])
def test_decode_charges_each_strategys_weight_shares(strategy):
    """The region (one: both layers and the LM head) holds, per core, the strategy's shares of
    every layer's four matrices and of the LM head, beside WaferLLM's norm weights (a
    hidden-chunk of 6 per norm); a step's peak is at least that on the fullest core."""
    mesh = Mesh(SIDE, SIDE, HW, dry_run=True, memory="warn", routes="strict")
    decoder = decoder_class(strategy)(mesh, CONFIG, None, capacity_tokens=8)
    assert decoder.plan.regions == 1 and decoder.plan.layers_per_region == 2
    chunk = cdiv(48, SIDE)
    layer = sum(share(strategy, kind, *SHAPES[kind]) for kind in ("qkv", "o", "gate_up", "down")) + 2 * chunk
    expected = HW.element_bytes * (2 * layer + share(strategy, "lm_head", *SHAPES["lm_head"]) + chunk)
    np.testing.assert_array_equal(mesh.memory.buffers["weights"], block(mesh, expected))
    decoder.load_prompt_cache(None, None, 5)
    decoder.step(None, 5)
    assert mesh.max_over_ranks(int(mesh.memory.peak.max())) >= expected.max()
    mesh.free()


def test_decode_weight_shares_by_hand():
    """Entries worked out by hand on 8 x 8 (64 cores; 12 + 6 norm elements a layer and the
    final norm). Megatron-LM: q|k|v 48 x 2 (80 outputs, w = 2), W_O's 48 rows on rows 0-5
    (w = 1) of 48 outputs each, gate|up 48 x 3, W_down's 80 rows w = 2 of 48, the LM head 48 x 2:
    core (0, 0) 2·(96 + 48 + 144 + 96 + 12) + 96 + 6 = 894, core (7, 0) (no W_O) 798. Ladder
    (h rows of n_pad on the first ceil(m / h) cores): h = 1 of 128, 48, 192 and 128 (q|k|v,
    W_O, gate|up, LM head) on ids < 48, W_down's h = 2 of 48 on ids < 40: core (0, 0)
    2·(128 + 48 + 192 + 96 + 12) + 128 + 6 = 1,086, core (5, 0) (id 40, no W_down) 894, core
    (7, 7) the norms alone, 30. T10 (ring 1, column-parallel everywhere): W_down 80 x 1 on rows
    0-5: core (0, 0) 2·(96 + 48 + 144 + 80 + 12) + 102 = 862, core (7, 0) 606."""
    cases = {"megatron": {(0, 0): 894, (7, 0): 798}, "ladder": {(0, 0): 1086, (5, 0): 894, (7, 7): 30},
             "t10": {(0, 0): 862, (7, 0): 606}}
    for strategy, cores in cases.items():
        mesh = Mesh(SIDE, SIDE, HW, dry_run=True, memory="warn", routes="strict")
        decoder_class(strategy)(mesh, CONFIG, None, capacity_tokens=8)
        for core, elements in cores.items():
            charged = mesh.value_at(core, lambda: int(mesh.memory.buffers["weights"][mesh.to_local(core)]))
            assert charged == HW.element_bytes * elements, (strategy, core)
        mesh.free()


@pytest.mark.parametrize("strategy", ["megatron", "ladder", "t10"])
def test_prefill_charges_each_strategys_weight_shares(strategy):
    """Each layer the prefill region holds is charged, per core, the strategy's shares of its
    four matrices beside WaferLLM's norm weights (a column block of 6 each)."""
    mesh = Mesh(SIDE, SIDE, HW, dry_run=True, memory="warn", routes="strict")
    seen = []
    result = prefill(mesh, CONFIG, None, 6, runner=prefill_runner(strategy),
                     on_layer=lambda: seen.append(mesh.memory.buffers["prefill.weights"].copy()))
    layer = sum(share(strategy, kind, *SHAPES[kind]) for kind in ("qkv", "o", "gate_up", "down")) + 2 * 6
    expected = HW.element_bytes * layer
    np.testing.assert_array_equal(seen[0], block(mesh, result.layers_per_region * expected))
    mesh.free()
    assert len(set(MPI.COMM_WORLD.allgather(result.layers_per_region))) == 1
