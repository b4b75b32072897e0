"""LLaMA prefill on a square mesh (llm/prefill.py, PAPER.md section 4) against the numpy oracle.

Numeric runs on 2x2 and 4x4 meshes must give the reference's last-token logits and its K/V
caches; the dry run must give the same modeled cycles; and the modeled cycles must not depend
on the rank split (compared with a one-rank run of this process on MPI.COMM_SELF).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from mpi4py import MPI

from llm.checkpoint import random_weights
from llm.config import LlamaConfig
from llm.errors import ModelError
from llm.prefill import PrefillLayout, prefill
from llm.reference import ReferenceModel, apply_rope, rope_cos_sin
from meshmpi import Mesh, load_hardware
from meshes import record_live_buffers, whole_mesh_buffers

pytestmark = pytest.mark.mpi

MHA = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, vocab_size=64, head_dim=8, rms_norm_eps=1e-5)
GQA = LlamaConfig(hidden_size=60, intermediate_size=100, num_hidden_layers=2, num_attention_heads=6,
                  num_key_value_heads=2, vocab_size=128, head_dim=10, rope_theta=500000.0)
CASES = [(MHA, 2, 5), (MHA, 4, 7), (GQA, 2, 7), (GQA, 4, 5)]


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


@pytest.mark.parametrize("config,n,length", CASES, ids=["mha-2x2-T5", "mha-4x4-T7", "gqa-2x2-T7", "gqa-4x4-T5"])
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


@pytest.mark.parametrize("config,n,length", CASES, ids=["mha-2x2-T5", "mha-4x4-T7", "gqa-2x2-T7", "gqa-4x4-T5"])
def test_modeled_cycles_dry_and_rank_invariant(config, n, length):
    numeric, _, _ = _run(config, n, length)
    dry, _, leftover = _run(config, n, length, dry_run=True)
    assert dry.last_hidden is None and dry.k_cache is None and dry.v_cache is None
    assert dry.modeled_cycles == numeric.modeled_cycles
    assert dry.cycles_per_layer == numeric.cycles_per_layer
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


def test_head_slots_make_rope_local():
    """Host permutation: each core holds rotate_half pairs side by side; RoPE on the pairs
    equals the reference's RoPE, and the permutation leaves q.k unchanged."""
    config = GQA
    for n in (2, 3, 4):
        lay = PrefillLayout(config, n, 7)
        slots = lay.head_slots(1).reshape(n, lay.pc, 2)
        real = slots[slots[..., 0] >= 0]
        assert np.all(real[:, 1] - real[:, 0] == config.head_dim // 2)
        assert sorted(slots[slots >= 0].tolist()) == list(range(config.head_dim))
        rng = np.random.default_rng(n)
        x = rng.standard_normal((7, config.head_dim)).astype(np.float32)
        cos, sin = rope_cos_sin(config, np.arange(7))
        expected = apply_rope(x, cos, sin)
        tile_cos, tile_sin = lay.rope_tiles()
        cos_full = tile_cos.transpose(0, 2, 1, 3).reshape(lay.t_pad, n * lay.pc)[:7]
        sin_full = tile_sin.transpose(0, 2, 1, 3).reshape(lay.t_pad, n * lay.pc)[:7]
        flat = slots.reshape(-1)
        permuted = np.where(flat >= 0, x[:, np.maximum(flat, 0)], 0).reshape(7, n * lay.pc, 2)
        even, odd = permuted[..., 0], permuted[..., 1]
        rotated = np.stack([even * cos_full - odd * sin_full, odd * cos_full + even * sin_full], -1)
        back = lay.unpermute_heads(rotated.reshape(7, -1), 1)[0]
        np.testing.assert_allclose(back, expected, atol=1e-5)


def closed_form_prefill_buffers(config, n, tokens) -> dict:
    """Elements per core of every buffer a prefill layer holds, by name (layer 0), worked out
    from the layout of PAPER.md §4 on an n x n mesh: tokens in row blocks of tb, features in
    column blocks; each core holds 2*pc dims of every head; K-chunks of the square MeshGEMM are
    the column blocks of A."""
    cdiv = lambda a, b: -(-a // b)  # noqa: E731
    tb, hb, fb = cdiv(tokens, n), cdiv(config.hidden_size, n), cdiv(config.intermediate_size, n)
    dc = 2 * cdiv(config.head_dim // 2, n)
    nq, nkv = config.num_attention_heads, config.num_key_value_heads
    g, qkv = nq // nkv, (nq + 2 * nkv) * dc
    sizes = {"prefill.x": tb * hb, "prefill.rope.cos": tb * dc // 2, "prefill.rope.sin": tb * dc // 2,
             "prefill.layer0.w_qkv": hb * qkv, "prefill.layer0.qkv.c": tb * qkv, "prefill.layer0.kv": 2 * tb * nkv * dc,
             "prefill.layer0.q": nkv * g * tb * dc, "prefill.layer0.k": nkv * tb * dc, "prefill.layer0.v": nkv * tb * dc,
             "prefill.layer0.qk.c": nkv * g * tb * tb, "prefill.layer0.softmax.max": nkv * g * tb, "prefill.layer0.softmax.sum": nkv * g * tb,
             "prefill.layer0.pv.c": nkv * g * tb * dc, "prefill.layer0.attn": tb * nq * dc, "prefill.layer0.w_o": nq * dc * hb,
             "prefill.layer0.o.c": tb * hb, "prefill.layer0.w_gate_up": hb * 2 * fb, "prefill.layer0.gate_up.c": tb * 2 * fb,
             "prefill.layer0.act": tb * fb, "prefill.layer0.w_down": fb * hb, "prefill.layer0.down.c": tb * hb}
    spares = {"qkv": ("prefill.x", "prefill.layer0.w_qkv"), "pv": ("prefill.layer0.qk.c", "prefill.layer0.v"), "o": ("prefill.layer0.attn", "prefill.layer0.w_o"),
              "gate_up": ("prefill.x", "prefill.layer0.w_gate_up"), "down": ("prefill.layer0.act", "prefill.layer0.w_down")}
    for gemm, (a, b) in spares.items():
        sizes[f"prefill.layer0.{gemm}.a.next"], sizes[f"prefill.layer0.{gemm}.b.next"] = sizes[a], sizes[b]
    sizes["prefill.layer0.qk.c.next"], sizes["prefill.layer0.qk.b.next"] = sizes["prefill.layer0.qk.c"], sizes["prefill.layer0.k"]
    for norm in ("prefill.layer0.input_norm", "prefill.layer0.post_norm", "prefill.final_norm"):
        sizes.update({f"{norm}.ss": tb, f"{norm}.w": hb, f"{norm}.out": tb * hb})
    return sizes


@pytest.mark.parametrize("n", [2, 3, 4, 5])
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
                                        "prefill.layer0.qkv.c", "prefill.layer0.kv", "prefill.layer0.qk.c"}
        assert not any(name.endswith(".next") for phase, live in at_end.items() for name in live
                       if not phase.endswith("compute_shift"))
