"""The prefill->decode re-layout of the KV cache (llm/relayout.py): what moves, against brute force
over the two layouts' column maps, and its modeled time independent of ranks and payloads; the
hand-off of the hidden vector between regions against its closed form."""
import numpy as np
import pytest
from mpi4py import MPI

from llm.config import LlamaConfig
from llm.decode import Decoder
from llm.layout import DecodeLayout
from llm.prefill import PrefillLayout
from llm.relayout import _rounds, column_moves, relayout_kv, row_moves
from meshmpi import Mesh

CONFIG = LlamaConfig(hidden_size=64, intermediate_size=80, num_hidden_layers=2, num_attention_heads=8,
                     num_key_value_heads=2, vocab_size=50, head_dim=16)


def brute_column_moves(config, n, rows, cols):
    """Per (prefill column, decode column): kv dims both hold, by scanning both layouts' slots
    (a prefill column holds the K dims of its share: [W_k | W_v] columns below kv_heads*head_dim)."""
    prefill = PrefillLayout(config, n, 8)
    decode = DecodeLayout.for_config(config, rows, cols)
    where = {}                                   # kv dim (head*head_dim + d) -> prefill column
    for j, share in enumerate(prefill.kv_slots()):
        for dim in share.ravel():
            if 0 <= dim < config.num_key_value_heads * config.head_dim:
                assert int(dim) not in where, "each K dim is made once"
                where[int(dim)] = j
    moves = {}
    for c, dims in enumerate(decode.kv_index().reshape(cols, decode.s)):
        for dim in dims[dims >= 0]:
            key = (where[int(dim)], c)
            moves[key] = moves.get(key, 0) + 1
    return moves


@pytest.mark.parametrize("n, rows, cols", [(2, 2, 2), (4, 4, 6), (3, 5, 3), (8, 8, 8), (5, 5, 12), (13, 13, 20)])
def test_column_moves_match_both_layouts(n, rows, cols):
    got = column_moves(PrefillLayout(CONFIG, n, 8), DecodeLayout.for_config(CONFIG, rows, cols))
    assert got == brute_column_moves(CONFIG, n, rows, cols)
    assert sum(got.values()) == CONFIG.num_key_value_heads * CONFIG.head_dim   # every kv dim once


@pytest.mark.parametrize("tokens, n, rows", [(1, 3, 3), (7, 3, 3), (10, 4, 6), (40, 8, 5), (3, 4, 5)])
def test_row_moves_send_every_token_once(tokens, n, rows):
    moves = row_moves(PrefillLayout(CONFIG, n, tokens), rows, tokens)
    assert sum(moves.values()) == tokens
    tb = -(-tokens // n)
    owner = [t // tb for t in range(tokens)]                      # prefill row block of each token
    counts = {}
    sizes = [tokens // rows + (1 if r < tokens % rows else 0) for r in range(rows)]
    start = 0
    for r, size in enumerate(sizes):                              # decode rows: balanced blocks in order
        for t in range(start, start + size):
            counts[(owner[t], r)] = counts.get((owner[t], r), 0) + 1
        start += size
    assert moves == counts


def test_rounds_give_each_destination_one_source_per_round():
    pairs = {(0, 0): 3, (1, 0): 2, (2, 1): 1, (3, 1): 4, (0, 2): 1, (1, 2): 2, (2, 3): 5}
    rounds = _rounds(pairs)
    seen = {}
    for deliveries in rounds:
        dsts = [d for _, d, _ in deliveries]
        assert len(dsts) == len(set(dsts))
        for s, d, amount in deliveries:
            seen[(s, d)] = amount
    assert seen == {k: v for k, v in pairs.items() if k[0] != k[1]}


@pytest.mark.mpi
@pytest.mark.parametrize("side,rows,cols", [(6, 6, 8), (8, 4, 6)])
def test_relayout_time_is_the_same_on_any_ranks_and_without_payload(side, rows, cols):
    """Dry and numeric, every rank split: the same modeled cycles, and more than nothing; on the
    decode region when it holds the prefill square, on the prefill square when that is larger."""
    world = MPI.COMM_WORLD
    results = []
    fabric = (rows, cols) if side <= min(rows, cols) else (side, side)
    for comm, dry in ((world, False), (world, True), (MPI.COMM_SELF, False)):
        mesh = Mesh(*fabric, comm=comm, dry_run=dry)
        relayout_kv(mesh, PrefillLayout(CONFIG, side, 20), DecodeLayout.for_config(CONFIG, rows, cols), 20, 2)
        results.append(mesh.modeled_cycles())
        mesh.free()
    assert results[0] > 0 and results[1] == results[0] and results[2] == results[0]
    assert all(r == results[0] for r in world.allgather(results[0]))


def test_relayout_refuses_regions_that_do_not_nest():
    mesh = Mesh(4, 6, comm=MPI.COMM_SELF, dry_run=True)
    with pytest.raises(ValueError, match="hold the other"):
        relayout_kv(mesh, PrefillLayout(CONFIG, 5, 20), DecodeLayout.for_config(CONFIG, 4, 6), 20, 2)
    mesh.free()


@pytest.mark.mpi
@pytest.mark.parametrize("cols", [3, 8])
def test_hand_off_between_regions_closed_form(cols):
    """From equal clocks: the previous region's last column starts a send and the chunk crosses
    one free link (start + alpha + S); this region's first column then starts a multicast along
    its row, which reaches the far end after alpha*(cols-1) + S."""
    mesh = Mesh(4, cols, dry_run=True)
    hw = mesh.hardware
    decoder = Decoder(mesh, CONFIG, None, layers=1, capacity_tokens=4)
    x = mesh.alloc("x", (decoder.layout.hidden_chunk,), np.float32)
    serial = x.tile_bytes / hw.link_bytes_per_cycle
    got = decoder.hand_off(x)
    mesh.free()
    start, alpha = hw.transfer_start_cycles, hw.alpha_cycles_per_hop
    assert got == pytest.approx(2 * start + alpha + serial + alpha * (cols - 1) + serial)
