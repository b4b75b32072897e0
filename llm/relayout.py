"""The prefill→decode re-layout of the KV cache, timed on the decode region's fabric (PAPER.md §5,
"Prefill→decode transition").

Prefill leaves the cache on its N x N square; the smaller of the two regions is the top-left
corner of the larger (the decode region inside a larger prefill square, as in PAPER.md §7's
660² prefill and 360² decode, or the other way round), and the move runs on the larger: core
(i, j) holds the tokens of row block i and the kv dims of column j's share
(:class:`llm.prefill.PrefillLayout`: each kv dim is made on one column of its head's segment). Decode wants the tokens of row r's balanced block
on row r and the kv slots of :class:`llm.layout.DecodeLayout` on column c. The move is
dimension-ordered, as the fabric routes it:

1. along each row of the square (X): every (prefill column, decode column) pair that shares kv
   dims exchanges those dims of the row block's tokens;
2. along each column (Y): every (prefill row block, decode row) pair that shares tokens
   exchanges those tokens' slots of that column.

Each phase runs as rounds of line patterns (a destination takes one source per round); the
rounds of a phase are in flight together, so they share links as messages do. The messages are
relayed in software (``beta`` a hop): one prefill column feeds many decode columns, more paths
than a router has routes, while relays need two routes per direction. A round's tile is
its largest delivery (the deliveries of a round are equal when the shapes divide evenly). The
numbers in the cache are placed by the host (:meth:`llm.decode.Decoder.load_prompt_cache`);
these transfers carry payloads of the right size, so what the fabric times is what moves.
"""
from __future__ import annotations

import numpy as np

from meshmpi.mesh import block_offsets


def _rounds(pairs: dict) -> list:
    """Split {(src, dst): amount} into rounds in which every destination has one source."""
    by_dst = {}
    for (src, dst), amount in sorted(pairs.items()):
        if src != dst and amount > 0:
            by_dst.setdefault(dst, []).append((src, amount))
    rounds = []
    for k in range(max((len(v) for v in by_dst.values()), default=0)):
        rounds.append([(v[k][0], dst, v[k][1]) for dst, v in sorted(by_dst.items()) if k < len(v)])
    return rounds


def column_moves(prefill_layout, decode_layout) -> dict:
    """{(prefill column, decode column): kv dims (per kv head and token) they share}."""
    where = prefill_layout.kv_columns()
    slots = decode_layout.kv_index().reshape(decode_layout.cols, decode_layout.s)
    moves = {}
    for c in range(decode_layout.cols):
        for j in where[slots[c][slots[c] >= 0]].tolist():
            moves[(j, c)] = moves.get((j, c), 0) + 1
    return moves


def row_moves(prefill_layout, rows: int, tokens: int) -> dict:
    """{(prefill row block, decode row): tokens they share}."""
    tb = prefill_layout.tb
    bounds = block_offsets(tokens, rows)     # balanced; rows beyond the tokens stay empty
    moves = {}
    for i in range(prefill_layout.n):
        lo, hi = i * tb, min((i + 1) * tb, tokens)
        for r in range(rows):
            shared = min(hi, bounds[r + 1]) - max(lo, bounds[r])
            if shared > 0:
                moves[(i, r)] = shared
    return moves


def relayout_kv(mesh, prefill_layout, decode_layout, tokens: int, layers: int) -> None:
    """Move a prefilled cache of ``tokens`` tokens (``layers`` layers, k and v) into the decode
    layout on ``mesh``'s fabric, advancing its clocks (see the module docstring). ``mesh`` is
    the larger of the two regions."""
    n, rows, cols = prefill_layout.n, decode_layout.rows, decode_layout.cols
    if not ((n <= min(rows, cols) and (mesh.rows, mesh.cols) == (rows, cols))
            or (n >= max(rows, cols) and (mesh.rows, mesh.cols) == (n, n))):
        raise ValueError("one region must hold the other, and the move runs on the larger")
    x_rounds = _rounds(column_moves(prefill_layout, decode_layout))
    y_rounds = _rounds(row_moves(prefill_layout, rows, tokens))
    with mesh.phase("relayout"), mesh.fabric.scope():
        # Along X on the square's rows: a row block's tokens (at most tb), dims per pair.
        _run(mesh, "x", x_rounds, lambda amount: amount * prefill_layout.tb * 2 * layers,
             lines=range(min(n, mesh.rows)))
        mesh.step("relayout along X")
        # Along Y on every column: shared tokens, the column's s slots each.
        _run(mesh, "y", y_rounds, lambda amount: amount * 2 * layers * decode_layout.s,
             lines=None if cols == mesh.cols else range(cols))
        mesh.step("relayout along Y")


def _run(mesh, axis: str, rounds: list, elements_of, lines) -> None:
    transfers, buffers = [], []
    for k, deliveries in enumerate(rounds):
        src, dst, amount = (np.array(v) for v in zip(*deliveries))
        elements = int(max(elements_of(int(a)) for a in amount))
        pattern = mesh.fabric.plan(f"relayout.{axis}.{k}", axis, src, dst, relay=True, group=f"relayout.{axis}.{k}")
        send = mesh.alloc(f"relayout.{axis}.{k}.send", (elements,), np.float32, charge=False)
        recv = mesh.alloc(f"relayout.{axis}.{k}.recv", (elements,), np.float32, charge=False)
        transfers.append(pattern.start(send, recv, lines=None if lines is None else list(lines)))
        buffers += [send, recv]
    for transfer in transfers:
        transfer.wait()
    for buffer in buffers:
        buffer.free()
