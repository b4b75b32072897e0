"""GGUF files (llama.cpp's format) load as the same model as the safetensors checkpoint they were
written from: the same config, the same weights (dequantized: the reference is the weights the
package's own dequantizer gives back), the same tokenizer and the same generated tokens.

The files are written by the gguf package's GGUFWriter (tests/gguf_files.py), q/k permuted as
llama.cpp's converter permutes them.
"""
import json
import pathlib

import numpy as np
import pytest

from gguf_files import llama_cpp_permute, write_gguf
from llm.checkpoint import load_checkpoint, random_weights, save_checkpoint
from llm.config import LlamaConfig
from llm.errors import ModelError
from llm.gguf import GGUFModel, is_gguf, load_gguf, permute_for_gguf, unpermute_from_gguf
from llm.reference import ReferenceModel
from llm.tokenizer import load_tokenizer

TINY = pathlib.Path(__file__).resolve().parents[1] / "llm" / "models" / "tiny"
# rows of 32 (a quantization block) for every matrix; GQA; untied
BLOCKS = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=48, head_dim=16, bos_token_id=1, eos_token_ids=(2,),
                     rms_norm_eps=1e-5, rope_theta=5e4, max_position_embeddings=128)


@pytest.fixture(scope="module")
def blocks_dir(tmp_path_factory):
    return save_checkpoint(tmp_path_factory.mktemp("blocks"), BLOCKS, random_weights(BLOCKS, seed=7))


def test_the_permutation_puts_rope_pairs_side_by_side():
    """HF rotates dims (i, i + d/2) of each head; llama.cpp rotates (2i, 2i+1)."""
    heads, d = 3, 8
    w = np.arange(heads * d)[:, None] * np.ones((1, 5))
    p = permute_for_gguf(w, heads)
    for h in range(heads):
        for i in range(d // 2):
            assert p[h * d + 2 * i, 0] == h * d + i and p[h * d + 2 * i + 1, 0] == h * d + i + d // 2
    np.testing.assert_array_equal(p, llama_cpp_permute(w, heads))
    np.testing.assert_array_equal(unpermute_from_gguf(p, heads), w)


@pytest.mark.parametrize("kind", [None, "F16", "BF16", "Q8_0", "Q4_0", "Q4_1"])
def test_every_tensor_type_loads_as_the_dequantized_weights(tmp_path, blocks_dir, kind):
    path = tmp_path / "m.gguf"
    expected = write_gguf(path, blocks_dir, kind)
    config, weights, _ = load_gguf(path)
    assert config == LlamaConfig(**{**BLOCKS.__dict__, "torch_dtype": "float32"})
    for name, value in weights.to_hf().items():
        np.testing.assert_array_equal(value, expected[name], err_msg=name)
    if kind is None:    # F32: exactly the checkpoint's weights
        for name, value in load_checkpoint(blocks_dir).to_hf().items():
            np.testing.assert_array_equal(weights.to_hf()[name], value, err_msg=name)
    if kind in ("Q8_0", "Q4_0"):   # quantized for real: not the float weights
        assert not np.array_equal(weights.layers[0].q_proj, load_checkpoint(blocks_dir).layers[0].q_proj)


def test_q8_0_generates_the_tokens_of_its_dequantized_weights(tmp_path, blocks_dir):
    path = tmp_path / "q8.gguf"
    expected = write_gguf(path, blocks_dir, "Q8_0")
    reference_dir = tmp_path / "dequantized"
    reference_dir.mkdir()
    from safetensors.numpy import save_file
    (reference_dir / "config.json").write_text(json.dumps(BLOCKS.to_dict()))
    save_file(expected, str(reference_dir / "model.safetensors"))
    config, weights, _ = load_gguf(path)
    want, _ = ReferenceModel(BLOCKS, load_checkpoint(reference_dir)).generate([1, 5, 9, 3], 8, ignore_eos=True)
    got, _ = ReferenceModel(config, weights).generate([1, 5, 9, 3], 8, ignore_eos=True)
    assert got == want


def test_tokenizer_from_the_gguf_vocabulary_equals_tokenizer_json(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_gguf(path, TINY, add_bos=True)
    ours, theirs = GGUFModel(path).tokenizer(), load_tokenizer(TINY)
    text = "The meaning of life is 42; naïve café — 日本語 ✓\n\tindented</s>"
    assert ours.encode(text) == theirs.encode(text) and ours.encode(text)[0] == 0
    assert ours.encode(text)[-1] == 1 and ours.decode(ours.encode(text)) == "<s>" + text
    assert GGUFModel(write_gguf(tmp_path / "no-bos.gguf", TINY, add_bos=False) and
                     tmp_path / "no-bos.gguf").tokenizer().encode("The")[0] != 0


def test_a_gguf_without_a_vocabulary_has_no_tokenizer(tmp_path, blocks_dir):
    write_gguf(tmp_path / "m.gguf", blocks_dir)
    assert GGUFModel(tmp_path / "m.gguf").tokenizer() is None


def test_gguf_errors_name_the_problem(tmp_path, blocks_dir):
    from gguf import GGMLQuantizationType, GGUFWriter, quants

    assert not is_gguf(blocks_dir / "config.json") and not is_gguf(tmp_path / "absent.gguf")
    write_gguf(tmp_path / "gpt2.gguf", blocks_dir, arch="gpt2")
    with pytest.raises(ModelError, match="architecture 'gpt2' is not supported"):
        GGUFModel(tmp_path / "gpt2.gguf")
    (tmp_path / "cut.gguf").write_bytes((tmp_path / "gpt2.gguf").read_bytes()[:100])
    with pytest.raises(ModelError, match="cannot read GGUF file"):
        GGUFModel(tmp_path / "cut.gguf")
    # a tensor of a type the loader does not dequantize
    write_gguf(tmp_path / "m.gguf", blocks_dir)
    model = GGUFModel(tmp_path / "m.gguf")
    w = GGUFWriter(str(tmp_path / "iq.gguf"), "llama")
    for key, field in model.fields.items():
        if key.startswith("llama."):
            w.add_uint32(key, int(field.contents())) if isinstance(field.contents(), int) \
                else w.add_float32(key, float(field.contents()))
    shape = (BLOCKS.hidden_size, 256)
    raw = np.zeros(quants.quant_shape_to_byte_shape(shape, GGMLQuantizationType.TQ1_0), np.uint8)
    w.add_tensor("token_embd.weight", raw, raw_dtype=GGMLQuantizationType.TQ1_0)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(ModelError, match=r"token_embd.weight has GGML type TQ1_0, which is not supported"):
        GGUFModel(tmp_path / "iq.gguf").tensor("token_embd.weight", shape)
    with pytest.raises(ModelError, match=r"missing tensor output.weight"):
        GGUFModel(tmp_path / "iq.gguf").tensor("output.weight", (3, 4))


def _run(*argv):
    from llm.generate import build_parser, run_generate
    return run_generate(build_parser().parse_args(["generate", *argv, "--json"]))


@pytest.mark.mpi
def test_generate_from_gguf_gives_the_safetensors_tokens(mpi_tmp_path):
    """The built-in model as F32 and as Q8_0 GGUF: the tokens and text of the safetensors
    directory (Q8_0: of a directory holding its dequantized weights)."""
    from mpi4py import MPI
    from safetensors.numpy import save_file

    from meshes import fits

    if not fits(8, 8):
        pytest.skip("mesh smaller than the rank grid")
    f32, q8, dq = mpi_tmp_path / "tiny.gguf", mpi_tmp_path / "tiny-q8.gguf", mpi_tmp_path / "tiny-dq"
    if MPI.COMM_WORLD.Get_rank() == 0:
        write_gguf(f32, TINY, add_bos=True)
        dq.mkdir()
        for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
            (dq / name).write_bytes((TINY / name).read_bytes())
        save_file(write_gguf(q8, TINY, "Q8_0", add_bos=True), str(dq / "model.safetensors"))
    MPI.COMM_WORLD.Barrier()
    run = ("--prompt", "The meaning of", "--max-new-tokens", "6", "--mesh", "8x8", "--ignore-eos")
    want = _run("--model", "tiny", *run)
    got = _run("--model", str(f32), *run, "--check")
    assert (got["tokens"], got["text"], got["prompt_tokens"]) == (want["tokens"], want["text"], want["prompt_tokens"])
    want = _run("--model", str(dq), *run)
    got = _run("--model", str(q8), *run)
    assert got["tokens"] == want["tokens"] and got["text"] == want["text"]
    dry = _run("--model", str(q8), "--dry-run", "--prompt-len", "5", "--max-new-tokens", "2", "--mesh", "8x8")
    assert dry["regions"] == want["regions"] and dry["layers_per_region"] == want["layers_per_region"]


@pytest.mark.mpi
@pytest.mark.parametrize("kind", [None, "Q8_0"])
def test_each_rank_dequantizes_only_the_rows_its_decode_block_holds(mpi_tmp_path, kind):
    """A GGUF matrix's stored rows are its output features: a rank dequantizes those of its
    columns' chunks only (the k/q rows in Hugging Face order), and the placed blocks equal the
    placement of the wholly dequantized weights."""
    from mpi4py import MPI

    from llm.decode import Decoder
    from meshes import fits
    from meshmpi import Mesh
    from test_llm_load import chunk_span

    rows, cols = 4, 6
    if not fits(rows, cols):
        pytest.skip("mesh smaller than the rank grid")
    path = mpi_tmp_path / "blocks.gguf"
    if MPI.COMM_WORLD.Get_rank() == 0:
        write_gguf(path, TINY, kind)
    MPI.COMM_WORLD.Barrier()
    config, lazy, _ = load_gguf(path)
    whole = {field: np.asarray(getattr(lazy.layers[0], field)) for field in ("gate_proj", "q_proj")}
    lazy.embed.model.rows_read = {}
    mesh = Mesh(rows, cols, memory="warn")
    decoder = Decoder(mesh, config, lazy, capacity_tokens=4)
    read = lazy.embed.model.rows_read
    f = chunk_span(config.intermediate_size, cols, mesh.col_start, mesh.col_stop)
    assert read["blk.0.ffn_gate.weight"] == read["blk.0.ffn_up.weight"] == f
    if mesh.col_stop - mesh.col_start < cols:       # this rank holds some of the columns only
        assert read["blk.0.attn_q.weight"] < config.num_attention_heads * config.head_dim
    eager = Mesh(rows, cols, memory="warn")
    dense = load_gguf(path)[1]
    dense.layers[0].gate_proj, dense.layers[0].q_proj = whole["gate_proj"], whole["q_proj"]
    reference = Decoder(eager, config, dense, capacity_tokens=4)
    for name in ("gate_up", "qkv"):
        np.testing.assert_array_equal(decoder.layers[0][name].data, reference.layers[0][name].data)
    mesh.free()
    eager.free()
