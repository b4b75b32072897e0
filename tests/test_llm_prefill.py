"""LLaMA prefill on a square mesh (llm/prefill.py, PAPER.md section 4) against the numpy oracle.

Numeric runs on small meshes (heads more or fewer than columns, segments that do not divide the
columns, more columns than head_dim/2) must give the reference's last-token logits and its K/V
caches; the dry run must give the same modeled cycles; and the modeled cycles must not depend
on the rank split (compared with a one-rank run of this process on MPI.COMM_SELF). The FLOPs the
mesh charges are checked against closed forms of the layout and of the unpadded model.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from mpi4py import MPI

from llm.checkpoint import random_weights
from llm.config import LlamaConfig
from llm.errors import ModelError
from llm.prefill import PrefillLayout, prefill, prefill_flops, real_flops
from llm.presets import PRESET_NAMES, preset
from llm.reference import ReferenceModel, apply_rope, rope_cos_sin
from meshmpi import Mesh, load_hardware
from meshes import record_live_buffers, whole_mesh_buffers

pytestmark = pytest.mark.mpi

MHA = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, vocab_size=64, head_dim=8, rms_norm_eps=1e-5)
GQA = LlamaConfig(hidden_size=60, intermediate_size=100, num_hidden_layers=2, num_attention_heads=6,
                  num_key_value_heads=2, vocab_size=128, head_dim=10, rope_theta=500000.0)
CASES = [(MHA, 2, 5), (MHA, 4, 7), (GQA, 2, 7), (GQA, 4, 5), (GQA, 5, 7), (GQA, 7, 4), (MHA, 9, 5)]
IDS = ["mha-2x2-T5", "mha-4x4-T7", "gqa-2x2-T7", "gqa-4x4-T5", "gqa-5x5-T7", "gqa-7x7-T4", "mha-9x9-T5"]


def _ids(config, length, seed=7):
    return np.random.default_rng(seed).integers(0, config.vocab_size, length)


def _run(config, n, length, seed=0, comm=None, dry_run=False):
    weights = None if dry_run else random_weights(config, seed)
    mesh = Mesh(n, n, load_hardware("wse2"), comm=comm, dry_run=dry_run)
    try:
        result = prefill(mesh, config, weights, length if dry_run else _ids(config, length))
        leftover = (sorted(mesh.memory.buffers), sorted(mesh.routes.groups))
    finally:
        mesh.free()
    return result, weights, leftover


@pytest.mark.parametrize("config,n,length", CASES, ids=IDS)
def test_prefill_matches_reference(config, n, length):
    result, weights, leftover = _run(config, n, length)
    ref = ReferenceModel(config, weights)
    logits = ref.prefill(_ids(config, length))
    mine = result.last_hidden @ weights.lm_head
    assert result.last_hidden.shape == (config.hidden_size,)
    np.testing.assert_allclose(mine, logits[-1], atol=1e-4, rtol=0)
    assert len(result.k_cache) == len(result.v_cache) == config.num_hidden_layers
    for mine_k, mine_v, ref_k, ref_v in zip(result.k_cache, result.v_cache, ref.k_cache, ref.v_cache):
        assert mine_k.shape == ref_k.shape == (config.num_key_value_heads, length, config.head_dim)
        np.testing.assert_allclose(mine_k, ref_k, atol=1e-5, rtol=0)
        np.testing.assert_allclose(mine_v, ref_v, atol=1e-5, rtol=0)
    assert result.tokens == length and result.layers == config.num_hidden_layers
    assert 0 < result.cycles_per_layer < result.modeled_cycles
    assert leftover == ([], []), "every buffer and route is released at the end"


@pytest.mark.parametrize("config,n,length", CASES, ids=IDS)
def test_modeled_cycles_dry_and_rank_invariant(config, n, length):
    numeric, _, _ = _run(config, n, length)
    dry, _, leftover = _run(config, n, length, dry_run=True)
    assert dry.last_hidden is None and dry.k_cache is None and dry.v_cache is None
    assert dry.modeled_cycles == numeric.modeled_cycles
    assert dry.cycles_per_layer == numeric.cycles_per_layer
    assert (dry.flops_charged, dry.flops_real) == (numeric.flops_charged, numeric.flops_real)
    assert leftover == ([], [])
    single, _, _ = _run(config, n, length, comm=MPI.COMM_SELF, dry_run=True)
    assert single.modeled_cycles == numeric.modeled_cycles
    assert single.cycles_per_layer == numeric.cycles_per_layer
    everyone = MPI.COMM_WORLD.allgather((numeric.modeled_cycles, numeric.cycles_per_layer))
    assert len(set(everyone)) == 1


def test_layers_argument_and_padding_ignored():
    """One simulated layer: the layer-0 cost equals a full run's; padded tokens never leak
    into real ones (the same prompt on a larger padding gives the same state)."""
    config = MHA
    weights = random_weights(config, 1)
    ids = _ids(config, 5)
    results = []
    for n in (2, 4):  # T = 5 pads to 6 and to 8
        mesh = Mesh(n, n)
        try:
            results.append(prefill(mesh, config, weights, ids, layers=1))
        finally:
            mesh.free()
    np.testing.assert_allclose(results[0].last_hidden, results[1].last_hidden, atol=1e-5)
    np.testing.assert_allclose(results[0].k_cache[0], results[1].k_cache[0], atol=1e-6)
    assert len(results[0].k_cache) == 1
    one, _, _ = _run(config, 2, 5, seed=1)
    assert one.cycles_per_layer == results[0].cycles_per_layer


def test_usage_errors():
    weights = random_weights(MHA, 0)
    mesh = Mesh(2, 4)
    try:
        with pytest.raises(ModelError, match="square"):
            prefill(mesh, MHA, weights, [1, 2, 3])
    finally:
        mesh.free()
    mesh = Mesh(2, 2)
    try:
        with pytest.raises(ModelError, match="weights"):
            prefill(mesh, MHA, None, [1, 2])
        with pytest.raises(ModelError, match="token ids"):
            prefill(mesh, MHA, weights, 3)
        with pytest.raises(ModelError, match="layers"):
            prefill(mesh, MHA, weights, [1, 2], layers=3)
    finally:
        mesh.free()


def cdiv(a, b):
    return -(-a // b)


def attention_cells(config, n):
    """The attention layout's sizes, restated from PAPER.md section 4's rule (group the heads):
    kv slots per column, query cells per slot, columns per block, pair blocks, pairs per cell and
    K|V values each column makes per slot."""
    nq, nkv, half = config.num_attention_heads, config.num_key_value_heads, config.head_dim // 2
    group = nq // nkv
    if nkv >= n:                     # whole kv groups on each column
        return dict(kpc=cdiv(nkv, n), hq=group, sb=1, blocks=1, p=half, share=4 * half)
    width = n // nkv                 # the narrowest kv head segment
    hq = cdiv(group, width)
    sb = cdiv(group, hq)
    p = cdiv(half, width // sb)
    return dict(kpc=1, hq=hq, sb=sb, blocks=width // sb, p=p, share=max(cdiv(4 * p, sb), 2 * cdiv(p, sb)))


@pytest.mark.parametrize("config,n", [(GQA, 2), (GQA, 3), (GQA, 4), (GQA, 7), (GQA, 12), (MHA, 2), (MHA, 9), (MHA, 6)])
def test_slot_maps_hold_every_dim_once_and_make_rope_local(config, n):
    """Every query dim sits in exactly one cell, every K and V dim in exactly one column's
    share; a column's cells hold the dims of its kv slots (q.k stays local); rotate_half pairs
    sit side by side, and RoPE on the pairs with the layout's angle tiles equals the reference's."""
    lay = PrefillLayout(config, n, 7)
    assert {k: getattr(lay, k) for k in attention_cells(config, n)} == attention_cells(config, n)
    d, half = config.head_dim, config.head_dim // 2
    q = lay.q_slots()
    assert sorted(q[q >= 0].tolist()) == list(range(config.num_attention_heads * d))
    kv = lay.kv_slots()
    assert sorted(kv[kv >= 0].tolist()) == list(range(2 * config.num_key_value_heads * d))
    group = config.num_attention_heads // config.num_key_value_heads
    keys = lay.attn_kv_slots()                                                  # [n, kpc, 2p]
    cells = q.reshape(n, lay.kpc, lay.hq, -1)
    assert np.all((cells < 0) | ((cells // d) // group * d + cells % d == keys[:, :, None, :]))
    pairs = q.reshape(n, lay.cells, lay.p, 2)
    real = pairs[..., 0] >= 0
    assert np.all(pairs[..., 1][real] - pairs[..., 0][real] == half)
    rng = np.random.default_rng(n)
    x = rng.standard_normal((7, config.num_attention_heads * d)).astype(np.float32)
    cos, sin = rope_cos_sin(config, np.arange(7))
    expected = np.concatenate([apply_rope(x[:, h * d:(h + 1) * d], cos, sin)
                               for h in range(config.num_attention_heads)], 1)
    tile_cos, tile_sin = (t.transpose(0, 2, 1, 3).reshape(lay.t_pad, n, lay.kpc, 1, lay.p)[:7]
                          for t in lay.rope_tiles())
    flat = q.reshape(-1)
    permuted = np.where(flat >= 0, x[:, np.maximum(flat, 0)], 0).reshape(7, n, lay.kpc, lay.hq, lay.p, 2)
    even, odd = permuted[..., 0], permuted[..., 1]
    rotated = np.stack([even * tile_cos - odd * tile_sin, odd * tile_cos + even * tile_sin], -1).reshape(7, -1)
    back = np.zeros_like(x)
    back[:, flat[flat >= 0]] = rotated[:, flat >= 0]
    np.testing.assert_allclose(back, expected, atol=1e-5)


def closed_form_prefill_buffers(config, n, tokens) -> dict:
    """Elements per core of every buffer a prefill layer holds, by name (layer 0), worked out
    from the layout of PAPER.md §4 on an n x n mesh: tokens in row blocks of tb, features in
    column blocks; each column holds kpc kv slots of p pairs (K, V and a share of them) and hq
    query cells per slot (:func:`attention_cells`); the scores and P hold every query head;
    K-chunks of the square MeshGEMM are the column blocks of A."""
    tb, hb, fb = cdiv(tokens, n), cdiv(config.hidden_size, n), cdiv(config.intermediate_size, n)
    a = attention_cells(config, n)
    kpc, p2, share, nq = a["kpc"], 2 * a["p"], a["share"], config.num_attention_heads
    cells = kpc * a["hq"]
    qkv = cells * p2 + kpc * share
    weights = {"w_qkv": hb * qkv, "w_o": cells * p2 * hb, "w_gate_up": hb * 2 * fb, "w_down": fb * hb}
    sizes = {"prefill.x": tb * hb, "prefill.rope.cos": tb * kpc * a["p"], "prefill.rope.sin": tb * kpc * a["p"],
             "prefill.final_norm.w": hb,
             # one layer resident (the model has one): its four matrices and two norm weights
             "prefill.weights": sum(weights.values()) + 2 * hb,
             "prefill.kv_cache": 2 * tb * kpc * p2,           # the layer's K|V, kept for the re-layout
             "prefill.layer0.qkv.c": tb * qkv, "prefill.layer0.q": cells * tb * p2,
             "prefill.layer0.kv.share": tb * kpc * share, "prefill.layer0.kv.share.next": tb * kpc * share,
             "prefill.layer0.kv.blocks": a["sb"] * tb * kpc * share, "prefill.layer0.kv": 2 * tb * kpc * p2,
             "prefill.layer0.k": kpc * tb * p2, "prefill.layer0.v": kpc * tb * p2,
             "prefill.layer0.qk.c": nq * tb * tb, "prefill.layer0.softmax.max": nq * tb,
             "prefill.layer0.softmax.sum": nq * tb, "prefill.layer0.pv.c": cells * tb * p2,
             "prefill.layer0.attn": tb * cells * p2,
             "prefill.layer0.o.c": tb * hb, "prefill.layer0.gate_up.c": tb * 2 * fb,
             "prefill.layer0.act": tb * fb, "prefill.layer0.down.c": tb * hb}
    spares = {"qkv": ("prefill.x", weights["w_qkv"]), "pv": ("prefill.layer0.qk.c", "prefill.layer0.v"),
              "o": ("prefill.layer0.attn", weights["w_o"]), "gate_up": ("prefill.x", weights["w_gate_up"]),
              "down": ("prefill.layer0.act", weights["w_down"])}
    for gemm, (a_name, b) in spares.items():
        sizes[f"prefill.layer0.{gemm}.a.next"] = sizes[a_name]
        sizes[f"prefill.layer0.{gemm}.b.next"] = sizes[b] if isinstance(b, str) else b
    sizes["prefill.layer0.qk.c.next"], sizes["prefill.layer0.qk.b.next"] = sizes["prefill.layer0.qk.c"], sizes["prefill.layer0.k"]
    for norm in ("prefill.layer0.input_norm", "prefill.layer0.post_norm", "prefill.final_norm"):
        sizes.update({f"{norm}.ss": tb, f"{norm}.out": tb * hb})
    return sizes


@pytest.mark.parametrize("n", [2, 3, 4, 5, 7])
def test_memory_ledger_at_every_phase_is_the_live_buffers_closed_forms(n):
    """Odd and even sides alike: at the end of every phase the ledger holds exactly the named
    buffers alive there, each at its closed-form size; the score matrix S stays charged
    through the softmax, and the kernels' spare buffers never outlive them."""
    config = dataclasses.replace(GQA, num_hidden_layers=1)
    eb = load_hardware("wse2").element_bytes
    sizes = closed_form_prefill_buffers(config, n, 7)
    for dry_run in (True, False):
        mesh = Mesh(n, n, dry_run=dry_run)
        seen = record_live_buffers(mesh)
        try:
            prefill(mesh, config, None if dry_run else random_weights(config, 0),
                    7 if dry_run else _ids(config, 7))
            seen = whole_mesh_buffers(mesh, seen)
        finally:
            leftover = dict(mesh.memory.buffers)
            mesh.free()
        assert leftover == {}
        for phase, live, resident in seen:
            assert {name: live[name] for name in live} == {name: sizes[name] * eb for name in live}, phase
            assert resident == sum(live.values()), phase
        at_end = {phase: set(live) for phase, live, _ in seen}
        assert at_end["prefill.layer0.softmax"] == {"prefill.x", "prefill.rope.cos", "prefill.rope.sin",
                                                    "prefill.final_norm.w", "prefill.weights",
                                                    "prefill.layer0.kv", "prefill.layer0.qk.c"}
        assert not any(name.endswith(".next") for phase, live in at_end.items() for name in live
                       if not phase.endswith("compute_shift"))


def closed_form_flops(config, n, tokens, layers):
    """(charged, real): the FLOPs the mesh charges for ``layers`` layers and the final norm, and
    those of the unpadded model, each written out.

    Every core is charged its real work only (uneven tiles: its real token rows, keys, K rows
    and columns), so the charge is the real FLOPs plus the distribution's own: in each norm,
    every one of the n cores of a row computes the row's 1/rms (4 a row) and the allreduce
    along x adds n - 1 deliveries of each row block's tb (padded) values, n lines; the
    softmax's max and sum allreduces do the same with nq * tb values."""
    tb = cdiv(tokens, n)
    nq, nkv, half = config.num_attention_heads, config.num_key_value_heads, config.head_dim // 2
    t, h, f, d = tokens, config.hidden_size, config.intermediate_size, config.head_dim
    real_norm = 4 * t * h + 4 * t
    real_layer = (2 * real_norm + 2 * t * h * (nq + 2 * nkv) * d + 6 * t * (nq + nkv) * half
                  + 2 * 2 * nq * t * t * d + 7 * nq * t * t + 2 * t * nq * d * h + 2 * t * h
                  + 2 * t * h * 2 * f + 5 * t * f + 2 * t * f * h)
    norm = real_norm + 4 * t * (n - 1) + n * (n - 1) * tb
    layer = real_layer + 2 * (norm - real_norm) + 2 * n * (n - 1) * nq * tb
    return layers * layer + norm, layers * real_layer + real_norm


@pytest.mark.parametrize("config,n,length", CASES, ids=IDS)
def test_charged_flops_are_the_real_ones_plus_the_closed_form_distribution(config, n, length):
    """On the mesh's own counters (numeric run, every rank split): padded rows, pairs and
    columns charge nothing, so the charge is the real FLOPs plus the distribution's closed form."""
    result, _, _ = _run(config, n, length)
    assert (result.flops_charged, result.flops_real) == closed_form_flops(config, n, length, config.num_hidden_layers)


TARGET_MESHES = (360, 420, 540, 660, 720, 750)


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_presets_charge_within_a_quarter_of_the_real_flops(name):
    """Closed forms only (no mesh): on 360^2-750^2, for prompts the rows divide and prompts
    they do not, the layout charges every operator at most 1.25x its real FLOPs; what it
    charges beyond them is the distribution's closed form (the norms' row scalars and the
    allreduces' adds), never padding."""
    config = preset(name)
    for n in TARGET_MESHES:
        for tokens in (2048, 4000, 4096, n * cdiv(4096, n)):
            lay = PrefillLayout(config, n, tokens)
            charged, real = lay.charged_flops(), real_flops(config, tokens)
            assert (prefill_flops(charged, 1), prefill_flops(real, 1)) == closed_form_flops(config, n, tokens, 1)
            tb, lines = cdiv(tokens, n), n * (n - 1)
            beyond = {op: 4 * tokens * (n - 1) + lines * tb for op in ("input_norm", "post_norm", "final_norm")}
            beyond["softmax"] = 2 * lines * config.num_attention_heads * tb
            assert {op: charged[op] - real[op] for op in charged} == {op: beyond.get(op, 0) for op in real}
            ratios = {op: charged[op] / real[op] for op in charged}
            assert max(ratios.values()) <= 1.25, (n, tokens, ratios)


def test_dry_run_charges_what_the_layout_says_phase_by_phase():
    """head_dim 128 on a 72 x 72 mesh (more columns than pairs per head, segments of several
    blocks): every operator's phase records the layout's closed-form charge."""
    config = LlamaConfig(hidden_size=512, intermediate_size=1024, num_hidden_layers=1, num_attention_heads=8,
                         num_key_value_heads=2, vocab_size=64, head_dim=128)
    n, tokens = 72, 150
    mesh = Mesh(n, n, dry_run=True)
    try:
        result = prefill(mesh, config, None, tokens)
        phases, _ = mesh.timeline.collect()
    finally:
        mesh.free()
    lay = PrefillLayout(config, n, tokens)
    assert lay.sb > 1 and lay.blocks > 1
    charged = lay.charged_flops()
    recorded = {p["name"]: p["flops"] for p in phases}
    for op in ("qkv", "qk", "pv", "o", "gate_up", "down"):
        assert recorded[f"prefill.layer0.{op}.compute_shift"] == charged[op], op
    for op in ("input_norm", "rope", "softmax", "post_norm"):
        assert recorded[f"prefill.layer0.{op}"] == charged[op], op
    assert recorded["prefill.final_norm"] == charged["final_norm"]
    assert result.flops_charged == prefill_flops(charged, 1) == closed_form_flops(config, n, tokens, 1)[0]


@pytest.mark.parametrize("n", [3, 4])
def test_prefill_regions_hold_what_fits_and_hand_off_in_closed_form(n):
    """Every layer's weights stay resident with the K|V each layer leaves; a region holds as many
    layers as fit beside layer 0's working buffers (sized here so that two do), the activations
    stream to the next region in ``start + alpha*n + n*S``, the numbers still equal the
    reference, and one layer extrapolated lands within 1% of simulating all six."""
    config = dataclasses.replace(GQA, num_hidden_layers=6)
    one = dataclasses.replace(config, num_hidden_layers=1)
    sizes = closed_form_prefill_buffers(one, n, 7)
    hw = load_hardware("wse2")
    eb = hw.element_bytes
    per_layer = (sizes["prefill.weights"] + sizes["prefill.kv_cache"]) * eb
    probe = Mesh(n, n, hw, dry_run=True)
    prefill(probe, one, None, 7)
    working = probe.max_over_ranks(int(probe.memory.peak.max())) - sizes["prefill.weights"] * eb
    probe.free()
    small = hw.with_overrides([f"sram_bytes_per_core={working + 2 * per_layer + per_layer // 2}"])
    weights = random_weights(config, 3)
    results = []
    for layers, dry in ((6, False), (6, True), (1, True)):
        mesh = Mesh(n, n, small, dry_run=dry)
        # every layer run: the dry run's timing is the numeric run's, to the bit (the advance of
        # steady layers, equal to rounding, is tested in test_steady.py)
        result = prefill(mesh, config, None if dry else weights, 7 if dry else _ids(config, 7), layers=layers,
                         run_every_layer=True)
        phases, _ = mesh.timeline.collect()
        assert mesh.max_over_ranks(int(mesh.memory.peak.max())) <= small.sram_bytes_per_core
        mesh.free()
        assert (result.layers_per_region, result.regions) == (2, 3)
        hand_offs = [p["end_cycles"] - p["start_cycles"] for p in phases if p["name"] == "prefill.hand_off"]
        assert len(hand_offs) == (2 if layers == 6 else 0)
        tile = -(-7 // n) * -(-config.hidden_size // n) * eb
        closed = hw.transfer_start_cycles + hw.alpha_cycles_per_hop * n + n * tile / hw.link_bytes_per_cycle
        assert result.hand_off_cycles == pytest.approx(closed)
        assert all(h == pytest.approx(closed) for h in hand_offs)
        results.append(result)
    ref = ReferenceModel(config, weights)
    logits = ref.prefill(_ids(config, 7))
    np.testing.assert_allclose(results[0].last_hidden @ weights.lm_head, logits[-1], atol=1e-4, rtol=0)
    assert results[0].modeled_cycles == results[1].modeled_cycles
    assert results[2].cycles(6) == pytest.approx(results[0].cycles(6), rel=1e-2)
