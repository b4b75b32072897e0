"""Checkpoints read per rank: each rank converts only the rows and columns of the weights its
cores hold, the numbers are those of the whole tensors, and a NaN anywhere is still refused.

The reads are counted by the reader itself (stored bytes per tensor) on every rank of a real
BF16 checkpoint and compared with the closed form of the rank's block of the decode layout;
the placements are compared with the whole-matrix placements of :mod:`kernels`.
"""
from __future__ import annotations

import re

import numpy as np
import pytest
from mpi4py import MPI
from safetensors.numpy import load_file

from kernels.gemm import GemmPlan, MeshGemm
from kernels.gemv import matrix_layout
from llm.checkpoint import check_finite, load_checkpoint, open_checkpoint, random_weights, save_checkpoint, select
from llm.config import LlamaConfig
from llm.errors import ModelError
from llm.decode import Decoder
from llm.generate import build_parser, run_generate
from llm.layout import DecodeLayout
from llm.prefill import _Prefill
from llm.reference import ReferenceModel
from meshes import fits
from meshmpi import UsageError

CONFIG = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=50, head_dim=8)
NAMES = {"q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
         "o_proj": "self_attn.o_proj", "gate_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj",
         "down_proj": "mlp.down_proj"}


def shared_checkpoint(path, dtype="bfloat16", mutate=None):
    """A checkpoint rank 0 writes into a directory every rank sees."""
    if MPI.COMM_WORLD.Get_rank() == 0:
        weights = random_weights(CONFIG, seed=7)
        if mutate is not None:
            mutate(weights)
        save_checkpoint(path, CONFIG, weights, dtype=dtype)
    MPI.COMM_WORLD.Barrier()
    return path


def chunk_span(length: int, parts: int, lo: int, hi: int) -> int:
    """Real indices in chunks lo..hi-1 of ``length`` cut into ``parts`` equal padded chunks."""
    chunk = -(-length // parts)
    return min(hi * chunk, length) - min(lo * chunk, length)


# ------------------------------------------------------------------------- serial
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_a_stored_tensor_reads_the_values_safetensors_reads(tmp_path, dtype):
    weights = open_checkpoint(save_checkpoint(tmp_path, CONFIG, random_weights(CONFIG, seed=1), dtype=dtype))
    stored = load_file(str(tmp_path / "model.safetensors"))
    rows, cols = np.array([5, 0, 31, 7]), np.array([47, 3, 3, 20])
    up = stored["model.layers.1.mlp.up_proj.weight"]                      # [out, in]
    np.testing.assert_array_equal(select(weights.layers[1].up_proj, rows, cols), up.T[np.ix_(rows, cols)])
    np.testing.assert_array_equal(weights.embed[[4, 4, 9]], stored["model.embed_tokens.weight"][[4, 4, 9]])
    assert weights.layers[1].up_proj.files.bytes_read["model.layers.1.mlp.up_proj.weight"] == 16 * up.itemsize


def test_bf16_reads_are_the_top_halves_of_float32(tmp_path):
    """A BF16 value is a float32 whose low 16 bits are zero: every element read from a BF16
    checkpoint is one, within half a BF16 step of the float32 it was saved from."""
    source = random_weights(CONFIG, seed=2)
    half = open_checkpoint(save_checkpoint(tmp_path, CONFIG, source, dtype="bfloat16"))
    value = np.asarray(half.layers[0].gate_proj)
    assert not np.any(value.view(np.uint32) & 0xFFFF)
    np.testing.assert_allclose(value, source.layers[0].gate_proj, rtol=2 ** -8)


@pytest.mark.parametrize("rows, cols, ranks", [(4, 4, (2, 2)), (3, 5, (3, 2)), (5, 3, (1, 3))])
def test_decode_blocks_equal_the_whole_placement(rows, cols, ranks):
    """Every rank block of every decode matrix equals the tiles of kernels' GEMV layout
    (:func:`kernels.gemv.matrix_layout`) of the whole matrix."""
    w = random_weights(CONFIG, seed=3)
    lay = DecodeLayout.for_config(CONFIG, rows, cols)
    whole = {("qkv", "y"): lay.qkv_matrix(w.layers[0].q_proj, w.layers[0].k_proj, w.layers[0].v_proj),
             ("o", "x"): lay.o_matrix(w.layers[0].o_proj),
             ("gate_up", "y"): lay.gate_up_matrix(w.layers[0].gate_proj, w.layers[0].up_proj),
             ("down", "x"): w.layers[0].down_proj}
    matrices = lay.layer_matrices(w.layers[0])
    y_bounds, x_bounds = (np.linspace(0, n, k + 1).astype(int) for n, k in ((rows, ranks[0]), (cols, ranks[1])))
    for (name, axis), matrix in whole.items():
        tiles = matrix_layout(rows, cols, *matrix.shape, axis).tiles(matrix, np.arange(rows), np.arange(cols))
        for r0, r1 in zip(y_bounds[:-1], y_bounds[1:]):
            for c0, c1 in zip(x_bounds[:-1], x_bounds[1:]):
                block = lay.place(matrices[name], axis, np.arange(r0, r1), np.arange(c0, c1))
                np.testing.assert_array_equal(block, tiles[r0:r1, c0:c1], err_msg=name)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_the_nan_scan_shared_out_finds_every_non_finite_value(tmp_path, dtype):
    """The first and the last stored element of a tensor are bad: in whatever number of shares
    the scan is cut, the shares' counts add up to 2; the largest finite float16 is not bad."""
    weights = random_weights(CONFIG, seed=4)
    weights.layers[0].q_proj[0, 0] = 65504.0
    clean = open_checkpoint(save_checkpoint(tmp_path / "clean", CONFIG, weights, dtype=dtype))
    check_finite(clean)
    weights.layers[1].down_proj[0, 0] = np.nan
    weights.layers[1].down_proj[-1, -1] = -np.inf
    opened = open_checkpoint(save_checkpoint(tmp_path / "bad", CONFIG, weights, dtype=dtype))
    files, name = opened.embed.files, "model.layers.1.mlp.down_proj.weight"
    for parts in (1, 2, 3, 7):
        assert sum(files.non_finite(name, part, parts) for part in range(parts)) == 2
        others = [{name: files.non_finite(name, part, parts)} for part in range(1, parts)]
        with pytest.raises(ModelError, match=rf"{re.escape(name)} .* 2 NaN or infinite"):
            check_finite(opened, 0, parts, lambda mine: [mine] + others)   # the ranks' counts


# ---------------------------------------------------------------------- under MPI
@pytest.mark.mpi
@pytest.mark.parametrize("rows, cols", [(4, 4), (3, 5)])
def test_each_rank_reads_only_its_block_of_the_decode_weights(mpi_tmp_path, new_mesh, rows, cols):
    """Bytes read per tensor on each rank = 2 (BF16) x the block's real rows x real columns, and
    over the ranks every matrix element is read exactly once."""
    if not fits(rows, cols):
        pytest.skip("mesh smaller than the rank grid")
    weights = open_checkpoint(shared_checkpoint(mpi_tmp_path / "bf16"))
    mesh = new_mesh(rows, cols, memory="warn")
    Decoder(mesh, CONFIG, weights, capacity_tokens=4)
    read = dict(weights.embed.files.bytes_read)
    lay = DecodeLayout.for_config(CONFIG, rows, cols)
    c = CONFIG
    h = chunk_span(c.hidden_size, rows, mesh.row_start, mesh.row_stop)
    f = chunk_span(c.intermediate_size, cols, mesh.col_start, mesh.col_stop)
    v = chunk_span(c.vocab_size, cols, mesh.col_start, mesh.col_stop)
    q = int((lay.q_index().reshape(cols, -1)[mesh.col_start:mesh.col_stop] >= 0).sum())
    kv = int((lay.kv_index().reshape(cols, -1)[mesh.col_start:mesh.col_stop] >= 0).sum())
    elements = {"q_proj": h * q, "k_proj": h * kv, "v_proj": h * kv, "o_proj": q * h,
                "gate_proj": h * f, "up_proj": h * f, "down_proj": f * h}
    want = {"lm_head.weight": h * v, "model.norm.weight": h}
    for i in range(c.num_hidden_layers):
        want.update({f"model.layers.{i}.{NAMES[k]}.weight": n for k, n in elements.items()})
        want.update({f"model.layers.{i}.{norm}.weight": h for norm in ("input_layernorm", "post_attention_layernorm")})
    assert read == {name: 2 * n for name, n in want.items()}
    sizes = {name: 2 * int(np.prod(shape)) for name, shape in
             ((n, weights.embed.files.entry(n)["shape"]) for n in want)}
    totals = {name: sum(r.get(name, 0) for r in mesh.cart.allgather(read)) for name in want}
    assert {n: t for n, t in totals.items() if "norm" not in n} == {n: s for n, s in sizes.items() if "norm" not in n}


@pytest.mark.mpi
def test_prefill_blocks_equal_the_whole_skewed_placement(mpi_tmp_path, new_mesh):
    """Each rank's pre-skewed B tiles of every prefill matrix equal the tiles of kernels' B
    layout (:meth:`kernels.gemm.GemmPlan.b_layout`) of the whole matrix, and a rank of several reads less than the whole tensor."""
    if not fits(4, 4):
        pytest.skip("mesh smaller than the rank grid")
    weights = open_checkpoint(shared_checkpoint(mpi_tmp_path / "bf16"))
    whole = load_checkpoint(mpi_tmp_path / "bf16").layers[0]
    mesh = new_mesh(4, 4, memory="warn")
    run = _Prefill(mesh, CONFIG, weights, tokens=6)
    lay, n = run.lay, 4
    cases = {"qkv": (CONFIG.hidden_size, n * lay.qkv_cols, lay.qkv_weight),
             "o": (n * lay.cells * 2 * lay.p, CONFIG.hidden_size, lay.o_weight),
             "gate_up": (CONFIG.hidden_size, n * 2 * lay.fb, lay.gate_up_weight),
             "down": (n * lay.fb, CONFIG.hidden_size, lay.down_weight)}
    for name, (k, cols, weight) in cases.items():
        plan = GemmPlan.build("meshgemm", n, n, lay.t_pad, k, cols)
        full = weight(whole)
        matrix = full.read(np.arange(k), np.arange(cols))
        tiles = plan.b_layout().tiles(matrix, mesh.global_rows(), mesh.global_cols())
        arr = run.place_weight(name, MeshGemm(mesh, lay.t_pad, k, cols), lambda: weight(weights.layers[0]))
        np.testing.assert_array_equal(arr.data, tiles)
        arr.free()
    read = weights.embed.files.bytes_read
    if mesh.size > 1:
        for short, long_name in NAMES.items():
            name = f"model.layers.0.{long_name}.weight"
            assert 0 < read[name] < 2 * getattr(whole, short).size, name


@pytest.mark.mpi
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_generate_from_a_lazily_read_checkpoint_matches_the_reference(mpi_tmp_path, dtype):
    if not fits(4, 4):
        pytest.skip("mesh smaller than the rank grid")
    path = shared_checkpoint(mpi_tmp_path / dtype, dtype)
    ids = [3, 9, 1, 4, 7]
    args = build_parser().parse_args(["generate", "--model", str(path), "--prompt-ids", ",".join(map(str, ids)),
                                      "--max-new-tokens", "5", "--ignore-eos", "--mesh", "4x4", "--check",
                                      "--json", "--memory", "warn"])
    report = run_generate(args)
    want, _ = ReferenceModel(CONFIG, load_checkpoint(path)).generate(ids, 5, ignore_eos=True)
    assert report["checked"] and report["tokens"] == want


@pytest.mark.mpi
def test_a_nan_in_a_layer_no_rank_places_is_refused_on_every_rank(mpi_tmp_path):
    """With --layers 1 no rank reads layer 1's weights, yet its NaN (found by whichever rank
    scans that share) stops every rank with the same one-line error and the job's total."""
    def damage(weights):
        weights.layers[1].down_proj[0, 0] = np.nan
        weights.layers[1].down_proj[-1, -1] = np.inf
    if not fits(3, 3):
        pytest.skip("mesh smaller than the rank grid")
    path = shared_checkpoint(mpi_tmp_path / "nan", mutate=damage)
    args = build_parser().parse_args(["generate", "--model", str(path), "--prompt-ids", "1,2", "--layers", "1",
                                      "--max-new-tokens", "2", "--mesh", "3x3", "--json", "--memory", "warn"])
    with pytest.raises(UsageError) as err:
        run_generate(args)
    message = str(err.value)
    assert "\n" not in message
    assert re.search(r"model\.layers\.1\.mlp\.down_proj\.weight .* 2 NaN or infinite", message), message
    assert MPI.COMM_WORLD.allgather(message) == [message] * MPI.COMM_WORLD.Get_size()
