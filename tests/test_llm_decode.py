"""Decode on the mesh against the numpy reference; KV cache policies (PAPER.md §5-6)."""
import numpy as np
import pytest
from mpi4py import MPI

from llm.checkpoint import random_weights
from llm.config import LlamaConfig, RopeScaling
from llm.decode import Decoder
from llm.layout import DecodeLayout
from llm.reference import ReferenceModel
from meshes import fits, make_mesh, record_live_buffers, whole_mesh_buffers
from meshmpi import CoreMemoryError, Mesh, load_hardware

pytestmark = pytest.mark.mpi

CONFIGS = {
    "gqa": dict(hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6,
                num_key_value_heads=2, vocab_size=70, head_dim=8),
    "mha_tied": dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                     vocab_size=50, tie_word_embeddings=True, rope_theta=500000.0),
    "llama31_rope": dict(hidden_size=32, intermediate_size=40, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=1, vocab_size=40,
                         rope_scaling=RopeScaling(8.0, 1.0, 4.0, 16)),
}


def _decode_against_reference(config, rows, cols, policy, steps=5, prompt=(3, 5, 7, 11, 2)):
    weights = random_weights(config, seed=4)
    ref = ReferenceModel(config, weights)
    last = ref.prefill(list(prompt))[-1]
    # one core cannot hold even these small models: record the overflow, keep the numbers
    mesh = Mesh(rows, cols, memory="warn" if rows * cols == 1 else "strict")
    decoder = Decoder(mesh, config, weights, policy=policy, capacity_tokens=len(prompt) + steps)
    decoder.load_prompt_cache(ref.k_cache, ref.v_cache, len(prompt))
    token, position, worst, tokens = int(np.argmax(last)), len(prompt), 0.0, []
    for _ in range(steps):
        want = ref.decode(token)
        got, _ = decoder.step(weights.embed[token], position)
        worst = max(worst, float(np.abs(got - want).max()))
        assert int(np.argmax(got)) == int(np.argmax(want))
        token, position = int(np.argmax(want)), position + 1
        tokens.append(token)
    return worst, decoder, mesh


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("grid", [(1, 1), (2, 2), (3, 4), (4, 2), (2, 3), (2, 12)])
def test_decode_matches_reference(name, grid):
    if not fits(*grid):
        pytest.skip("mesh smaller than the rank grid")
    worst, _, _ = _decode_against_reference(LlamaConfig(**CONFIGS[name]), *grid, "shift")
    assert worst < 1e-4


@pytest.mark.parametrize("policy", ["shift", "concat"])
def test_kv_policies_keep_order_and_balance(policy):
    if not fits(4, 3):
        pytest.skip("mesh smaller than the rank grid")
    config = LlamaConfig(**CONFIGS["gqa"])
    worst, decoder, mesh = _decode_against_reference(config, 4, 3, policy, steps=7)
    assert worst < 1e-4
    counts = decoder.kv.counts
    assert counts.sum() == 5 + 7
    if policy == "shift":
        assert counts.max() - counts.min() <= 1
        # balanced split with the extra tokens on the upper rows keeps time order by row
        assert list(counts) == sorted(counts, reverse=True)
    else:
        assert counts[-1] == 1 + 7 and list(counts[:-1]) == [2, 1, 1]


def test_concat_runs_out_of_memory_at_the_predicted_token_and_shift_does_not():
    if not fits(4, 2):
        pytest.skip("mesh smaller than the rank grid")
    config, rows = LlamaConfig(**CONFIGS["gqa"]), 4
    sram = load_hardware("wse2").sram_bytes_per_core
    for policy in ("concat", "shift"):
        mesh = Mesh(rows, 2, dry_run=True)
        # buffers for 800 tokens, layers planned with room for one token per row
        decoder = Decoder(mesh, config, None, policy=policy, capacity_tokens=800, plan_tokens=1)
        decoder.load_prompt_cache(None, None, rows)         # one prompt token per row
        per_token = decoder.plan.kv_bytes_per_token_per_core
        # closed form: the last row holds (sram - weights) // per_token tokens, one is the prompt's
        predicted = (sram - decoder.plan.weight_bytes_per_core) // per_token - 1
        appended = 0
        try:
            for _ in range(predicted + 1):
                decoder._append()
                appended += 1
        except CoreMemoryError as exc:
            assert policy == "concat", str(exc)
            assert appended == predicted
            assert f"core ({rows - 1}, 0)" in str(exc)
        else:
            assert policy == "shift"
            assert decoder.kv.counts.max() - decoder.kv.counts.min() <= 1


def test_regions_leave_room_for_the_context():
    """A longer context takes fewer layers per region (more regions), and a region filled to
    its planned context still fits the SRAM through a decode step."""
    if not fits(4, 4):
        pytest.skip("mesh smaller than the rank grid")
    config = LlamaConfig(**dict(CONFIGS["gqa"], num_hidden_layers=8))
    sram = load_hardware("wse2").sram_bytes_per_core
    per_region = []
    for per_row in (1, 300, 600):
        mesh = Mesh(4, 4, dry_run=True)
        decoder = Decoder(mesh, config, None, capacity_tokens=per_row + 1, layers=1)
        plan = decoder.plan
        per_region.append(plan.layers_per_region)
        if plan.regions > 1:   # full layer regions, then the last one with the rest and the LM head
            body = 8 - plan.last_region_layers
            assert (plan.regions - 2) * plan.layers_per_region < body <= (plan.regions - 1) * plan.layers_per_region
            assert 0 <= plan.last_region_layers <= plan.layers_per_region
        assert plan.per_row_capacity >= per_row + 1
        decoder.load_prompt_cache(None, None, 4 * per_row)
        decoder.step(None, 4 * per_row)                     # appends one token, runs a layer
        assert mesh.max_over_ranks(int(mesh.memory.peak.max())) <= sram
        mesh.free()
    assert per_region[0] > per_region[1] > per_region[2] >= 1


@pytest.mark.parametrize("rows,cols,algo", [(3, 3, "ktree"), (2, 12, "ktree"), (2, 12, "ring"), (3, 5, "pipeline")])
def test_dry_numeric_and_one_rank_decode_give_identical_modeled_numbers(rows, cols, algo):
    """Segmented score reductions included (uneven segments, padding columns, every algorithm)."""
    if not fits(rows, cols):
        pytest.skip("mesh smaller than the rank grid")
    config = LlamaConfig(**CONFIGS["gqa"])
    weights = random_weights(config, seed=2)
    ref = ReferenceModel(config, weights)
    ref.prefill([1, 2, 3, 4])
    results, logits = [], []
    for dry, comm in ((False, MPI.COMM_WORLD), (True, MPI.COMM_WORLD), (False, MPI.COMM_SELF)):
        mesh = Mesh(rows, cols, dry_run=dry, comm=comm)
        decoder = Decoder(mesh, config, None if dry else weights, capacity_tokens=10, allreduce_algo=algo)
        decoder.load_prompt_cache(None if dry else ref.k_cache, None if dry else ref.v_cache, 4)
        got, step = decoder.step(None if dry else weights.embed[5], 4)
        results.append((step.kv_shift, step.layers, step.head, mesh.modeled_cycles(), int(mesh.sum_over_ranks(
            int(mesh.counters["bytes_sent"].sum())))))
        logits += [] if dry else [got]
        mesh.free()
    want = ref.decode(5)
    assert all(np.abs(got - want).max() < 1e-4 for got in logits)
    assert results[0] == results[1] == results[2]
    assert all(r == results[0] for r in MPI.COMM_WORLD.allgather(results[0]))


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def closed_form_kv_slots(kv_heads: int, head_dim: int, cols: int) -> tuple[int, int]:
    """(kv dims per column s, kv heads per column): each kv head on its own segment of at least
    cols // kv_heads columns with one rotate-half pair or more per column, so
    s = 2 * ceil((head_dim / 2) / (cols // kv_heads)); with fewer columns than kv heads, whole
    heads, ceil(kv_heads / cols) of them, s = that many head_dims."""
    if cols >= kv_heads:
        return 2 * cdiv(head_dim // 2, cols // kv_heads), 1
    return cdiv(kv_heads, cols) * head_dim, cdiv(kv_heads, cols)


def closed_form_decode_buffers(config, rows, cols, tokens_on_fullest_row) -> dict:
    """Elements per core of the decode buffers (PAPER.md §5): the hidden vector in row chunks;
    the kv slots of :func:`closed_form_kv_slots` and the g query heads' dims at the same
    offsets; the FFN and vocabulary in column chunks; scores hold the fullest row's tokens for
    the column's query heads only."""
    h = cdiv(config.hidden_size, rows)
    kv = config.num_key_value_heads
    s, local_heads = closed_form_kv_slots(kv, config.head_dim, cols)
    g = config.num_attention_heads // kv
    f, v = cdiv(config.intermediate_size, cols), cdiv(config.vocab_size, cols)
    layers, column_q_heads = config.num_hidden_layers, local_heads * g
    per_layer = 2 * h + h * (g + 2) * s + g * s * h + h * 2 * f + f * h
    sizes = {"weights": layers * per_layer + h + h * v, "hidden": h,
             "kv_cache": tokens_on_fullest_row * 2 * s * layers, "decode.lm_head.y": v,
             "decode.final_norm.ss": 1, "decode.final_norm.out": h}
    for i in range(layers):
        per_buffer = {"norm1.ss": 1, "norm1.out": h, "qkv.y": (g + 2) * s,
                      "scores": tokens_on_fullest_row * column_q_heads, "max": column_q_heads,
                      "sum": column_q_heads, "o": g * s,
                      "o_proj.y": h, "norm2.ss": 1, "norm2.out": h, "gate_up.y": 2 * f, "act": f, "down.y": h}
        sizes.update({f"decode.layer{i}.{name}": size for name, size in per_buffer.items()})
    return sizes


@pytest.mark.parametrize("policy", ["shift", "concat"])
@pytest.mark.parametrize("rows,cols", [(3, 3), (4, 4), (3, 4), (4, 3), (4, 1), (2, 10)])
def test_memory_ledger_at_every_phase_is_the_live_buffers_closed_forms(rows, cols, policy):
    """At the end of every phase of every decode step the ledger holds exactly the live named
    buffers, each at its closed-form size (the KV cache at the fullest row's token count),
    on odd and even sides; between steps only the weights and the cache stay."""
    if not fits(rows, cols):
        pytest.skip("mesh smaller than the rank grid")
    config = LlamaConfig(**CONFIGS["gqa"])
    eb = load_hardware("wse2").element_bytes
    mesh = Mesh(rows, cols, dry_run=True)
    decoder = Decoder(mesh, config, None, policy=policy, capacity_tokens=12)
    assert decoder.plan.regions == 1
    decoder.load_prompt_cache(None, None, 5)
    seen = record_live_buffers(mesh)
    for step in range(3):
        decoder.step(None, 5 + step)
        for phase, live, resident in whole_mesh_buffers(mesh, seen):
            # the new token's slot is made first, in decode.kv_shift (it attends to itself)
            tokens = 5 + step + 1
            sizes = closed_form_decode_buffers(config, rows, cols, fullest_row(policy, rows, 5, tokens))
            assert live == {name: sizes[name] * eb for name in live}, (step, phase)
            assert resident == sum(live.values()), (step, phase)
        fullest_core = {name: mesh.max_over_ranks(size) for name, size in mesh.memory.live().items()}
        assert fullest_core == {"weights": sizes["weights"] * eb, "kv_cache": sizes["kv_cache"] * eb}
    mesh.free()


def fullest_row(policy: str, rows: int, prompt: int, tokens: int) -> int:
    """Tokens on the fullest row: the prompt is split evenly (the first rows take the extra),
    then shift keeps rows balanced and concat puts every new token on the last row."""
    split = [prompt // rows + (1 if r < prompt % rows else 0) for r in range(rows)]
    if policy == "shift":
        return -(-tokens // rows)
    return max(max(split), split[-1] + tokens - prompt)


@pytest.mark.parametrize("kv_heads,head_dim,cols", [(8, 128, 420), (8, 128, 360), (8, 128, 5), (2, 8, 3),
                                                    (2, 8, 12), (4, 8, 3), (1, 8, 4), (1, 8, 3), (2, 8, 2)])
def test_kv_heads_own_disjoint_segments_that_fill_the_columns(kv_heads, head_dim, cols):
    """Every kv dim once, rotate-half pairs side by side; the segments are disjoint spans in
    column order, each one kv head over its columns or whole kv heads on one column; only the
    last cols - kv_heads * head_dim / 2 columns (if any) hold padding only, outside every segment."""
    lay = DecodeLayout(rows=3, cols=cols, hidden=16, heads=2 * kv_heads, kv_heads=kv_heads,
                       head_dim=head_dim, ffn=16, vocab=16)
    half = head_dim // 2
    assert (lay.s, lay.heads_per_column) == closed_form_kv_slots(kv_heads, head_dim, cols)
    index = lay.kv_index().reshape(cols, lay.s)
    assert sorted(index[index >= 0].tolist()) == list(range(kv_heads * head_dim))
    pairs = index.reshape(cols, -1, 2)
    real = pairs[..., 0] >= 0
    assert np.all(pairs[..., 1][real] == pairs[..., 0][real] + half)
    assert np.all(pairs[..., 0][real] % head_dim < half) and np.all(pairs[..., 1][~real] < 0)
    heads_of = [set((index[c][index[c] >= 0] // head_dim).tolist()) for c in range(cols)]
    padding = max(0, cols - kv_heads * half)
    assert [c for c in range(cols) if not heads_of[c]] == list(range(cols - padding, cols))
    covered, owner = [], {}
    for k, (lo, hi) in enumerate(lay.segments):
        heads = set().union(*heads_of[lo:hi])
        assert hi - lo == 1 or (len(heads) == 1 and all(heads_of[c] == heads for c in range(lo, hi)))
        owner.update({head: k for head in heads})
        covered += range(lo, hi)
    assert covered == list(range(cols - padding)) and sorted(owner) == list(range(kv_heads))


def test_llama3_8b_scores_on_420_columns_carry_its_kv_group_only():
    """LLaMA3-8B on 420 columns: 8 segments of 52 or 53 columns, 4 kv dims per column, and
    the scores of 10 tokens a row are 4 query heads x 10 = 40 values per core (not 32 x 10)."""
    lay = DecodeLayout(rows=420, cols=420, hidden=4096, heads=32, kv_heads=8, head_dim=128,
                       ffn=14336, vocab=128256)
    assert sorted({hi - lo for lo, hi in lay.segments}) == [52, 53] and len(lay.segments) == 8
    assert lay.s == 4 and lay.padding_columns == 0 and lay.score_elements(10) == 40


def closed_form_payloads(config, rows, cols, tokens_on_fullest_row) -> dict:
    """Elements per core each decode reduction carries (PAPER.md §5 table): one sum of squares
    per norm; the fused q/k/v output (g query heads and k, v at s kv slots); the scores of the
    fullest row's tokens for the column's own query heads; one max and one sum per such head;
    p·V over the column's g x s query slots; the row chunk of hidden out of W_O and W_down;
    the column chunks of the FFN (gate and up) and of the vocabulary."""
    kv = config.num_key_value_heads
    s, local_heads = closed_form_kv_slots(kv, config.head_dim, cols)
    g = config.num_attention_heads // kv
    h = cdiv(config.hidden_size, rows)
    return {"norm1": 1, "qkv": (g + 2) * s, "scores": tokens_on_fullest_row * local_heads * g,
            "softmax_max": local_heads * g, "softmax_sum": local_heads * g, "pv": g * s, "o_proj": h,
            "norm2": 1, "gate_up": 2 * cdiv(config.intermediate_size, cols), "down": h,
            "final_norm": 1, "lm_head": cdiv(config.vocab_size, cols)}


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("rows,cols", [(3, 4), (2, 3), (2, 12), (4, 1)])
def test_decode_reduction_payloads_are_the_closed_forms(name, rows, cols):
    config = LlamaConfig(**CONFIGS[name])
    mesh = make_mesh(rows, cols, dry_run=True)
    decoder = Decoder(mesh, config, None, capacity_tokens=12, layers=1)
    decoder.load_prompt_cache(None, None, 7)
    decoder.step(None, 7)
    mesh.free()
    assert decoder.reduction_payloads == closed_form_payloads(config, rows, cols, cdiv(8, rows))


def test_attention_does_not_grow_with_padding_columns():
    """The GQA model has 2 kv heads of 4 rotate-half pairs: from 8 columns on, each kv head's
    segment has 4 columns and the columns past the 8th hold padding only. The algorithm then
    predicts the same attention on 8, 10, 13 and 16 columns: the q/k/v GEMV (reduced along Y,
    s = 2 slots), the scores (reduced along each 4-column segment, g x tokens values) and the
    softmax and p·V (along Y) see the same tiles and lines, so they end at the same modeled
    cycle. Only the W_O, gate/up and down GEMVs after them change with the width (their
    reductions span the whole row and the FFN is split over every column)."""
    config, ends = LlamaConfig(**CONFIGS["gqa"]), []
    g = config.num_attention_heads // config.num_key_value_heads
    for cols in (8, 10, 13, 16):
        mesh = make_mesh(3, cols, dry_run=True)
        decoder = Decoder(mesh, config, None, capacity_tokens=12, layers=1)
        decoder.load_prompt_cache(None, None, 7)
        decoder.step(None, 7)
        phases, _ = mesh.timeline.collect()
        mesh.free()
        end = {p["name"]: p["end_cycles"] for p in phases}
        ends.append([end[f"decode.layer0.{name}.ktree"] for name in ("scores", "softmax_max", "softmax_sum", "pv")])
        assert decoder.reduction_payloads["scores"] == 3 * g      # 3 tokens on the fullest row
    assert all(e == ends[0] for e in ends)


@pytest.mark.parametrize("per_row", [1, 300, 600])
def test_every_layer_simulated_equals_the_extrapolation(per_row):
    """``--layers all`` runs every layer and hands the vector on at each region boundary; one
    simulated layer times the layers, plus one hand-off per boundary, lands within 0.5% of it.
    What differs: later layers start behind their predecessor rather than the KV shift, and the
    shift carries every simulated layer's cache when more layers run than one region holds."""
    if not fits(4, 4):
        pytest.skip("mesh smaller than the rank grid")
    config = LlamaConfig(**dict(CONFIGS["gqa"], num_hidden_layers=8))
    totals = []
    for layers in (8, 1):
        mesh = Mesh(4, 4, dry_run=True)
        decoder = Decoder(mesh, config, None, capacity_tokens=per_row + 2, layers=layers)
        plan = decoder.plan
        decoder.load_prompt_cache(None, None, 4 * per_row)
        _, cycles = decoder.step(None, 4 * per_row)
        body = 8 - plan.last_region_layers
        assert plan.region_starts(8) == ([] if plan.regions == 1 else
                                         list(range(plan.layers_per_region, body, plan.layers_per_region)) + [body])
        assert len(cycles.layers) == layers
        if layers == 8:
            phases, _ = mesh.timeline.collect()
            assert sum(phase["name"] == "hand_off" for phase in phases) == plan.regions - 1
        totals.append(cycles.total(8))
        mesh.free()
    assert totals[1] == pytest.approx(totals[0], rel=5e-3)


@pytest.mark.parametrize("rows,cols", [(3, 4), (4, 3)])
def test_decode_charges_the_closed_form_flops_of_every_operator(rows, cols):
    """Per core and layer: each local GEMV 2·in·out; and, outside the kernels' phases, two
    RMSNorms (square-add 2 and scale 2 per element, 4 per row), RoPE (6 per rotate-half pair of
    q's heads and k), q·K and p·V (2 per multiply-add), the softmax (scale and mask 2, max 1,
    exp-subtract-add 3, divide 1 per score), two residual adds and SiLU·up (5 per element)."""
    if not fits(rows, cols):
        pytest.skip("mesh smaller than the rank grid")
    config = LlamaConfig(**CONFIGS["gqa"])
    mesh = Mesh(rows, cols, dry_run=True)
    decoder = Decoder(mesh, config, None, capacity_tokens=10)
    decoder.load_prompt_cache(None, None, 7)
    decoder.step(None, 7)
    phases, _ = mesh.timeline.collect()
    mesh.free()
    lay, cores = decoder.layout, rows * cols
    g, s, h, f = lay.group, lay.s, lay.hidden_chunk, lay.ffn_chunk
    cap = int(decoder.kv.counts.max())
    scores = cap * lay.heads_per_column * g
    local = {"qkv": 2 * h * (g + 2) * s, "o_proj": 2 * g * s * h, "gate_up": 2 * h * 2 * f, "down": 2 * f * h}
    outside = (2 * (2 * h + 4 + 2 * h) + 6 * (g + 1) * s // 2 + 2 * 2 * cap * g * s
               + (2 + 1 + 3 + 1) * scores + 2 * h + 5 * f)
    row = next(i for i, p in enumerate(phases) if p["name"] == "decode.layer0")
    children = [p for p in phases if p["parent"] == row]
    for name, flops in local.items():
        assert next(p["flops"] for p in children if p["name"] == f"decode.layer0.{name}.local") == flops * cores
    assert phases[row]["flops"] - sum(p["flops"] for p in children) == outside * cores
