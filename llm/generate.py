"""``python -m llm generate``: prefill a prompt with MeshGEMM, decode with MeshGEMV, stream tokens."""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time

import numpy as np

from kernels.allreduce import FORWARDING
from meshmpi import cli, energy, outputs, progress
from meshmpi.check import require_finite
from meshmpi.errors import CheckError, UsageError
from meshmpi.host import agree, world_share
from meshmpi.mesh import parse_grid
from meshmpi.text import article, plural
from meshmpi.trace import concat_timelines, write_trace

from . import e2e
from .checkpoint import check_finite, open_checkpoint, resolve_model_dir
from .config import LlamaConfig, generation_eos_ids
from .decode import POLICIES
from .errors import ModelError
from .gguf import is_gguf, load_gguf
from .presets import PRESET_NAMES as PRESETS, preset
from .plan import regions_text
from .session import Options, Session
from .strategies import STRATEGIES
from .tokenizer import load_tokenizer

EXAMPLES = """\
  mpiexec -n 4 python -m llm generate --model tiny --prompt "The meaning of" --max-new-tokens 24 --mesh 4x4
  mpiexec -n 2 python -m llm generate --model tiny --prompt-ids 1,2,3 --max-new-tokens 8 --mesh 3x5 --check --json
  python -m llm generate --model llama3-8b --dry-run --prompt-len 4096 --max-new-tokens 2 --mesh 420x420
  python -m llm generate --model ./my-llama --prompt "Hello" --kv concat --mesh 8x8 --trace run.h5
"""


def build_parser():
    p = cli.parser("python -m llm", "LLaMA inference on the emulated wafer.", EXAMPLES)
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate tokens from a prompt", epilog="examples:\n" + EXAMPLES,
                       formatter_class=p.formatter_class)
    g.add_argument("--model", default="tiny", help=f"tiny, a preset ({', '.join(PRESETS)}), a HF directory or a .gguf file")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="prompt text (needs the model's tokenizer)")
    src.add_argument("--chat", metavar="MESSAGE",
                     help="a user message, rendered with the model's chat template (tokenizer_config.json)")
    src.add_argument("--prompt-ids", help="prompt as comma-separated token ids")
    src.add_argument("--prompt-len", type=int, help="a prompt of N tokens without text (for dry runs)")
    g.add_argument("--system", metavar="MESSAGE", help="a system message before --chat's")
    g.add_argument("--add-bos", action=argparse.BooleanOptionalAction, default=None,
                   help="prepend the BOS token to --prompt, or not (default: the tokenizer's own rule)")
    g.add_argument("--max-new-tokens", type=int, default=16)
    g.add_argument("--ignore-eos", action="store_true",
                   help="keep going after an end-of-sequence token (generation_config.json's eos_token_id, "
                        "else config.json's)")
    g.add_argument("--mesh", default="4x4", metavar="ROWSxCOLS", help="the decode region (default 4x4)")
    g.add_argument("--prefill-mesh", metavar="NxN", help="the (square) prefill region (default: the largest square in --mesh); it may also hold --mesh in its corner")
    g.add_argument("--kv", choices=POLICIES, default="shift", help="KV cache policy (default shift)")
    g.add_argument("--allreduce", choices=("ktree", "pipeline", "ring"), default="ktree")
    g.add_argument("--strategy", choices=STRATEGIES, default="waferllm",
                   help="the prefill's and decode's mapping: WaferLLM's or a system it is compared with, "
                        "their GEMMs and GEMVs on the same regions (llm/strategies; default waferllm)")
    g.add_argument("--groups", type=int, help="K-tree groups per line (default about sqrt(N))")
    g.add_argument("--forwarding", choices=FORWARDING, default="stream",
                   help="allreduce chains: add and forward as the data streams past (stream, default) "
                        "or receive, add, then send (store)")
    g.add_argument("--layers", type=_layers_option, metavar="N|all",
                   help="layers to simulate, 'all' for every layer, region and hand-off; fewer are "
                        "extrapolated (default all; presets: 1)")
    g.add_argument("--run-every-layer", action="store_true",
                   help="dry runs: run every layer of the prefill and of each decode step (default: once "
                        "the layers are in a steady state, each moving every clock by the same cycles, the "
                        "rest are advanced, with the same results)")
    g.add_argument("--decode-samples", type=int, default=16, metavar="K",
                   help="dry runs: simulate the decode steps at K context lengths spread over the output "
                        "and integrate the rest (default 16; every step when the output is shorter)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--save-logits", metavar="FILE.npy", help="write the [new_tokens, vocab] float32 logits")
    g.add_argument("--quiet", action="store_true", help="no progress on stderr")
    g.add_argument("--check", action="store_true", help="run the numpy reference alongside; fail on any mismatch")
    cli.add_hardware_options(g)
    cli.add_defect_options(g)
    cli.add_run_options(g)
    g.set_defaults(func=generate)
    from .bench import register
    register(sub)
    from .plan import register
    register(sub)
    return p


def _load_model(args):
    """(config, weights or None, tokenizer or None). Weights are handles read lazily, each rank
    reading its cores' share; the scan for NaN and infinity is shared out over the ranks."""
    if args.model in PRESETS:
        if not args.dry_run:
            raise UsageError(f"preset {args.model} has shapes only: add --dry-run, or give a checkpoint directory")
        return preset(args.model), None, None
    try:
        if is_gguf(args.model):
            config, weights, tokenizer = load_gguf(args.model, weights=not args.dry_run)
        else:
            directory = resolve_model_dir(args.model)
            weights = None if args.dry_run else open_checkpoint(directory)
            config = weights.config if weights is not None else LlamaConfig.from_file(directory / "config.json")
            eos = generation_eos_ids(directory)
            if eos is not None:
                config = dataclasses.replace(config, eos_token_ids=eos)
            tokenizer = load_tokenizer(directory, config.bos_token_id)
        if weights is not None:
            check_finite(weights, *world_share())
        return config, weights, tokenizer
    except ModelError as exc:
        raise UsageError(str(exc)) from None


def _prompt_ids(args, config, tokenizer) -> list[int]:
    if args.prompt is not None or args.chat is not None:
        if tokenizer is None:
            raise UsageError("this model has no tokenizer (tokenizer.json): give --prompt-ids or --prompt-len")
        try:
            if args.chat is not None:   # the template writes any BOS itself
                from .chat import messages
                text = tokenizer.apply_chat_template(messages(args.chat, args.system))
                ids = tokenizer.encode(text, args.add_bos, special=False)
            else:
                ids = tokenizer.encode(args.prompt, args.add_bos)
        except ModelError as exc:
            raise UsageError(str(exc)) from None
    elif args.prompt_ids is not None:
        try:
            ids = [int(t) for t in args.prompt_ids.split(",") if t.strip()]
        except ValueError:
            raise UsageError(f"--prompt-ids expects comma-separated integers, got {args.prompt_ids!r}") from None
    else:
        n = args.prompt_len if args.prompt_len is not None else 8
        if n < 1:
            raise UsageError("--prompt-len must be at least 1")
        ids = [int(i) for i in np.random.default_rng(args.seed).integers(0, config.vocab_size, n)]
    if not ids:
        raise UsageError("the prompt is empty")
    bad = [i for i in ids if not 0 <= i < config.vocab_size]
    if bad:
        raise UsageError(f"token id {bad[0]} is outside the vocabulary [0, {config.vocab_size})")
    return ids


def _choose(logits: np.ndarray, args, rng) -> int:
    if args.temperature <= 0:
        return int(np.argmax(logits))
    z = (logits - logits.max()) / args.temperature
    p = np.exp(z) / np.exp(z).sum()
    order = np.argsort(-p)
    keep = order[: int(np.searchsorted(np.cumsum(p[order]), args.top_p) + 1)]
    return int(rng.choice(keep, p=p[keep] / p[keep].sum()))


def _save_npy(path: str, array: np.ndarray) -> None:
    def write(tmp):
        with open(tmp, "wb") as f:
            np.save(f, array)

    outputs.write_atomic(path, write)


def _layers_option(text: str):
    """``--layers``: a count, or ``all``."""
    if text == "all":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of layers or 'all', got {text!r}") from None


def _check_options(args) -> None:
    """What can be told wrong from the options alone, before any model is read."""
    if args.max_new_tokens < 1:
        raise UsageError("--max-new-tokens must be at least 1")
    if args.system is not None and args.chat is None:
        raise UsageError("--system goes with --chat (a system message before the user's)")
    if args.add_bos is not None and args.prompt is None and args.chat is None:
        raise UsageError("--add-bos/--no-add-bos apply to text: give --prompt or --chat")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise UsageError(f"--temperature must be a finite number >= 0 (0 = greedy), got {args.temperature}")
    if not (0 < args.top_p <= 1):
        raise UsageError(f"--top-p must be in (0, 1], got {args.top_p}")
    if isinstance(args.layers, int) and args.layers < 1:
        raise UsageError(f"--layers must be at least 1, got {args.layers}")
    e2e.check_samples(args.decode_samples)
    if args.check and args.dry_run:
        raise UsageError("--check compares numbers with the reference: it cannot be combined with --dry-run")
    if args.save_logits and args.dry_run:
        raise UsageError("--save-logits needs the logits of a numeric run: it cannot be combined with --dry-run")
    if args.groups is not None:
        if args.allreduce != "ktree":
            raise UsageError(f"--groups is for --allreduce ktree (K-tree groups); {args.allreduce} has none")
        if args.groups < 1:
            raise UsageError(f"--groups must be at least 1, got {args.groups}")


def _regions(args) -> tuple[tuple[int, int], tuple[int, int]]:
    """The decode region (``--mesh``) and the square prefill region, checked against each
    other and against the job's ranks."""
    rows, cols = parse_grid(args.mesh)
    if args.prefill_mesh:
        side = parse_grid(args.prefill_mesh, "prefill-mesh")
        if side[0] != side[1]:
            raise UsageError(f"--prefill-mesh must be square (MeshGEMM prefill), got {args.prefill_mesh}")
        if min(rows, cols) < side[0] < max(rows, cols):
            raise UsageError(f"--prefill-mesh {args.prefill_mesh} and --mesh {args.mesh}: one region must hold "
                             f"the other (the smaller is the larger's top-left corner)")
        what = f"--prefill-mesh {args.prefill_mesh}"
    else:
        side = (min(rows, cols),) * 2
        what = f"the prefill region implied by --mesh {args.mesh} (its largest square)"
    if args.groups is not None and args.groups > min(rows, cols):
        raise UsageError(f"--groups {args.groups}: more groups than the {min(rows, cols)} cores of the shorter "
                         f"side of --mesh {args.mesh} (decode reduces along both axes)")
    cli.check_fits(args, side, what)
    cli.check_fits(args, (rows, cols), f"--mesh {args.mesh}")
    return (rows, cols), side


def generate(args) -> int:
    report = run_generate(args)
    if args.json:
        cli.print_json(report)
    else:
        cli.say(_format(report, streamed=_streams(args, report)))
    cli.warn_summary(report["warnings"])
    return 0


def run_generate(args) -> dict:
    """The whole ``generate`` command on this job's ranks; returns the report (every rank)."""
    t_start = time.perf_counter()
    _check_options(args)
    (rows, cols), side = _regions(args)
    hardware = cli.hardware_from_args(args)
    cli.check_outputs(args, (args.save_logits, "--save-logits"))
    progress.stage(f"loading {args.model}", not args.quiet)
    config, weights, tokenizer = _load_model(args)
    ids = _prompt_ids(args, config, tokenizer)
    if len(ids) > config.max_position_embeddings:
        raise UsageError(f"the prompt has {len(ids)} tokens, more than the model's max_position_embeddings "
                         f"({config.max_position_embeddings})")
    sim_layers = {None: 1 if args.model in PRESETS else config.num_hidden_layers,
                  "all": config.num_hidden_layers}.get(args.layers, args.layers)
    if not 1 <= sim_layers <= config.num_hidden_layers:
        raise UsageError(f"--layers must be in 1..{config.num_hidden_layers}, got {sim_layers}")

    options = Options(kv=args.kv, allreduce=args.allreduce, groups=args.groups, forwarding=args.forwarding,
                      layers=sim_layers, decode_samples=args.decode_samples, progress=not args.quiet,
                      strategy=args.strategy, run_every_layer=args.run_every_layer)
    session = Session(config, weights, lambda r, c: cli.mesh_from_args(args, r, c, hardware), (rows, cols),
                      args.max_new_tokens, side[0], options)
    session.prefill(ids if weights is not None else len(ids), keep_timeline=bool(args.trace))
    mesh = session.mesh

    rng = np.random.default_rng(args.seed)
    stream = _stream(args, tokenizer, weights, ids)
    bar = _progress(args, mesh, streaming=stream is not None)

    token_walls = []        # when each new token was chosen (the emulator's own time)

    def on_token(token):
        token_walls.append(time.perf_counter())
        if stream is not None:
            cli.say(stream.push(token), end="")
        if bar is not None:
            bar.update(1)

    tokens = session.decode(lambda logits: _choose(logits, args, rng), on_token,
                            stop=() if args.ignore_eos else set(config.eos_token_ids))
    all_logits = session.logits
    if bar is not None:
        bar.close()
    if stream is not None:
        cli.say(stream.flush())

    failure = None      # a failed --check still writes --save-logits and --trace, then fails
    if args.check:
        try:
            _check(config, weights, ids, tokens, all_logits, args)
        except CheckError as exc:
            failure = exc
    report = {"model": args.model, **session.report()}
    report.update(text=tokenizer.decode(tokens) if tokenizer is not None and weights is not None else None,
                  checked=bool(args.check), check_failure=str(failure) if failure else None,
                  wall_seconds=time.perf_counter() - t_start,
                  wall_first_token_seconds=token_walls[0] - t_start,
                  wall_decode_seconds_per_token=(token_walls[-1] - token_walls[0]) / (len(token_walls) - 1)
                  if len(token_walls) > 1 else None)
    if args.save_logits:
        error = None
        if mesh.rank == 0:
            try:
                _save_npy(args.save_logits, np.stack(all_logits).astype(np.float32))
            except OSError as exc:
                error = f"cannot write --save-logits {args.save_logits}: {exc.strerror or exc}"
        error = agree(mesh, error)
        if error:
            raise UsageError(error)
    if args.trace:
        # prefill (on its own region), then the re-layout and decode on the decode region
        timeline = concat_timelines([session.prefill_timeline, mesh.timeline.collect()])
        write_trace(mesh, args.trace, kind="generate", result=report, warnings=report["warnings"],
                    timeline=timeline)
    session.close()
    if failure is not None:
        raise failure
    return report


def _streams(args, report) -> bool:
    """The text is printed as it is generated: a numeric run of a model with a tokenizer, not --json."""
    return not args.json and report["text"] is not None


def _stream(args, tokenizer, weights, ids):
    """The decoder that prints the new text as it comes, after printing the prompt: it starts
    from the prompt's ids, so the continuation joins the prompt as the tokenizer would join them."""
    if args.json or tokenizer is None or weights is None:
        return None
    stream = tokenizer.stream()
    prompt = "".join(stream.push(i) for i in ids)
    cli.say(prompt, end="")
    return stream


def _progress(args, mesh, streaming: bool):
    """Decode's progress on stderr (rank 0), unless --quiet or the text streams to a terminal
    (a bar's redraws would overwrite it, and the text itself shows the progress)."""
    if args.quiet or (streaming and sys.stdout.isatty()):
        return None
    return progress.Progress(args.max_new_tokens, "decode", "tokens")


def _check(config, weights, ids, tokens, logits, args) -> None:
    """Tokens equal to the numpy reference's, logits within 1e-4 (relative to the largest),
    and every logit finite on both sides."""
    from .reference import ReferenceModel
    ref_tokens, ref_logits = ReferenceModel(config, weights).generate(
        ids, len(tokens), eos=[] if args.ignore_eos else None, ignore_eos=True)
    mesh_logits = np.stack(logits)
    require_finite("the mesh's logits", mesh_logits)
    require_finite("the numpy reference's logits (the checkpoint's numbers overflow or are not numbers)",
                   ref_logits)
    worst = float(np.abs(mesh_logits - ref_logits[: len(logits)]).max())
    if args.temperature <= 0 and ref_tokens[: len(tokens)] != tokens:
        first = next(i for i, (a, b) in enumerate(zip(ref_tokens, tokens)) if a != b)
        raise CheckError(f"check failed: token {first} is {tokens[first]} on the mesh but "
                         f"{ref_tokens[first]} in the reference (max logit difference {worst:.3g})")
    if worst > 1e-4 * max(1.0, float(np.abs(ref_logits).max())):
        raise CheckError(f"check failed: logits differ from the reference by up to {worst:.3g}")
    cli.say(f"check: {len(tokens)} tokens identical to the numpy reference, logits within {worst:.2g}",
            file=sys.stderr)


def _integration_text(d: dict) -> str:
    if d["steps"] == d["simulated_steps"]:
        return f"{plural(d['steps'], 'step')}, every one simulated"
    return f"{d['steps']:,} steps integrated from {d['simulated_steps']} simulated contexts"


def _format(r: dict, streamed: bool = False) -> str:
    """The report in words; the text only when it was not already printed as it came."""
    lines = []
    if streamed:
        pass
    elif r["text"] is not None:
        lines.append(f"text: {r['text']}")
    elif r["tokens"]:
        lines.append(f"tokens: {r['tokens']}")
    rate = r["modeled_decode_tokens_per_s"]
    lines += [f"{r['model']} on {r['mesh']} (prefill {r['prefill_mesh']}, {r['hardware']}, {plural(r['ranks'], 'rank')}"
              f"{', dry run' if r['dry_run'] else ''}), KV {r['kv_policy']}"
              + ("" if r["strategy"] == "waferllm" else f", {r['strategy']} prefill and decode"),
              f"  prompt {r['prompt_tokens']} tokens, {r['new_tokens']} new",
              f"  modeled prefill   {r['modeled_prefill_seconds'] * 1e3:.4f} ms",
              f"  prefill FLOPs     {r['prefill_flops_charged']:,} charged, {r['prefill_flops_real']:,} real "
              f"({r['prefill_flops_charged'] / r['prefill_flops_real']:.3f}x; {plural(r['layers_simulated'], 'layer')} simulated"
              + (f", {r['prefill_layers_advanced']} of them advanced in a steady state"
                 if r["prefill_layers_advanced"] else "") + ")",
              "  modeled decode    " + (f"{rate:,.0f} tokens/s per request "
                                         f"({r['modeled_cycles_per_layer']:,.0f} cycles per layer)" if rate else "n/a (one token)"),
              f"  modeled e2e       {r['modeled_e2e_tokens_per_s']:,.1f} tokens/s over {r['modeled_e2e_seconds'] * 1e3:.4f} ms "
              f"(prefill {r['e2e_prefill_share']:.0%}; decode: {_integration_text(r['decode_integration'])})",
              *([f"  modeled energy    {r['energy_joules_per_token']:.4g} J per token, {energy.describe(r)}"
                 + (f"; decode {r['energy_decode_joules_per_token']:.4g} J per token"
                    if r["energy_decode_joules_per_token"] is not None else "")]
                if r.get("energy_joules") is not None else []),
              f"  regions           {regions_text(r)} "
              f"({r['cores_used']:,} cores, {r['wafers']:.2f} of {article(r['hardware'])} {r['hardware']} wafer)",
              f"  KV capacity       {r['kv_capacity_tokens']:,} tokens ({r['kv_policy']})",
              f"  peak memory       {r['peak_bytes_per_core']:,} B per core",
              *([f"  defects           {cli.defects_text(r['defects'])}"] if r.get("defects") else []),
              f"  wall time         {r['wall_seconds']:.2f} s"]
    return "\n".join(lines)
