"""``phase7fw eval``, ``phase7fw generate`` and ``phase7fw chat``: a trained checkpoint at work."""

from __future__ import annotations

import json
import sys

from phase7fw.cli.common import checkpoint_arg, cuda_graph_flag, plugins
from phase7fw.errors import Phase7Error


def load_for_inference(path, *, device: str | None = None, plugins=None, int8: bool = False):
    """Engine of a checkpoint for decoding: on a GPU with bf16/fp16 training precision the
    linear weights are stored in that precision (decoding reads every weight per token);
    ``int8``: the blocks' linear weights in int8 (:mod:`phase7fw.inference.int8`)."""
    from phase7fw.core.engine import Engine
    from phase7fw.inference.decoding import prepare_engine_for_decoding

    engine = Engine.from_checkpoint(path, device=device, plugins=plugins)
    prepare_engine_for_decoding(engine, int8=int8)
    return engine


def cmd_eval(args) -> int:
    from phase7fw.core.checkpoint import find_checkpoint
    from phase7fw.core.engine import Engine

    if args.batches is not None and args.batches < 1:  # before the model and the data load
        raise Phase7Error(f"--batches must be >= 1, got {args.batches}")
    path = find_checkpoint(args.checkpoint, args.runs_dir)
    if args.tasks:
        return _eval_tasks(args, path)
    engine = Engine.from_checkpoint(path, device=args.device, with_data=True, plugins=plugins())
    m = engine.evaluate(args.batches)
    bpb = f" | bpb {m['bpb']:.4f}" if m.get("bpb") is not None else ""
    print(f"{path} (step {engine.step}): val loss {m['loss']:.4f} | ppl {m['ppl']:.2f}{bpb}"
          f" | {m['tokens']:,} tokens")
    if args.json:
        print(json.dumps({"checkpoint": str(path), "step": engine.step, **m}))
    return 0


def _eval_tasks(args, path) -> int:
    """``eval --tasks``: lm-evaluation-harness on the checkpoint (phase7fw/inference/lm_harness.py)."""
    from pathlib import Path

    from phase7fw.core.engine import Engine
    from phase7fw.inference.lm_harness import load_tasks, results_table, run_tasks

    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if args.limit is not None and args.limit <= 0:
        raise Phase7Error(f"--limit must be > 0, got {args.limit}")
    load_tasks(names, args.include_path or [])  # bad names / unreachable datasets before the model loads
    engine = Engine.from_checkpoint(path, device=args.device, plugins=plugins())
    engine.checkpoint_file = str(path)
    default = Path(path).parent / f"lm_eval_{engine.model_name}_step{engine.step}.json"
    out = Path(args.output) if args.output else default
    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
    results = run_tasks(engine, names, include_paths=args.include_path or [], num_fewshot=args.num_fewshot,
                        limit=limit, output=out, log_samples=args.log_samples)
    print(results_table(results))
    print(f"wrote {out}")
    return 0


def _sampling(args):
    from phase7fw.inference.generation import SamplingParams

    return SamplingParams(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.repetition_penalty,
                          args.seed).checked()


def _inference_engine(args):
    """The engine of the checkpoint (or run folder) in ``args``, weights in the training
    precision on a GPU (fast decoding)."""
    from phase7fw.core.checkpoint import find_checkpoint

    path = find_checkpoint(args.checkpoint, args.runs_dir)
    return path, load_for_inference(path, device=args.device, plugins=plugins(), int8=args.int8)


def cmd_generate(args) -> int:
    params = _sampling(args)  # bad settings fail before the model loads
    _, engine = _inference_engine(args)
    if args.cuda_graph == "on" or args.compile_step:  # their errors before the prompt is echoed
        engine.decoder(use_cache=not args.no_cache, cuda_graph=args.cuda_graph, compile_step=args.compile_step)

    def stream(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    stream(args.prompt)
    stop = [unescape(t) for t in args.stop or []] or None
    engine.generate(args.prompt, max_new_tokens=params.max_new_tokens, temperature=params.temperature,
                    top_k=params.top_k, top_p=params.top_p, repetition_penalty=params.repetition_penalty,
                    seed=params.seed, use_cache=not args.no_cache, stop=stop, on_text=stream,
                    cuda_graph=args.cuda_graph, compile_step=args.compile_step)
    stream("\n")
    return 0


def unescape(text: str) -> str:
    """``\\n``, ``\\t`` and ``\\\\`` in a command-line argument (a newline is awkward to type)."""
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text) and text[i + 1] in "nt\\":
            out.append({"n": "\n", "t": "\t", "\\": "\\"}[text[i + 1]])
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def cmd_chat(args) -> int:
    from phase7fw.inference.chat import run_chat

    params = _sampling(args)
    path, engine = _inference_engine(args)
    return run_chat(engine, params, use_cache=not args.no_cache, cuda_graph=args.cuda_graph,
                    compile_step=args.compile_step, label=str(path))


def _sampling_flags(sp) -> None:
    sp.add_argument("--max-new-tokens", type=int, default=64)
    sp.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    sp.add_argument("--top-k", type=int, default=None)
    sp.add_argument("--top-p", type=float, default=None)
    sp.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats")
    sp.add_argument("--seed", type=int, default=None)
    sp.add_argument("--no-cache", action="store_true", help="recompute the context for every token (slow)")
    sp.add_argument("--int8", action="store_true",
                    help="int8 weight-only decoding: the blocks' linear layers keep int8 weights with one scale per"
                         " row (half the bytes a token reads; outputs differ slightly; docs/generation.md)")
    cuda_graph_flag(sp)


def add_eval(sub) -> None:
    ev = sub.add_parser("eval", help="validation loss, perplexity and bits per byte of a checkpoint, or"
                                     " lm-evaluation-harness tasks (--tasks)")
    checkpoint_arg(ev)
    ev.add_argument("--batches", type=int, default=None)
    ev.add_argument("--json", action="store_true", help="also print the metrics as one JSON line")
    harness = ev.add_argument_group("benchmarks (lm-evaluation-harness, pip install 'phase7fw[eval]')")
    harness.add_argument("--tasks", metavar="NAMES", help="comma-separated lm-eval task names (hellaswag,arc_easy)")
    harness.add_argument("--include-path", action="append", metavar="DIR", help="a folder of local task YAML files")
    harness.add_argument("--num-fewshot", type=int, default=None, help="examples in the prompt (default: the task's)")
    harness.add_argument("--limit", type=float, default=None,
                         help="documents per task (a number >= 1) or a fraction of them (< 1)")
    harness.add_argument("--output", metavar="PATH",
                         help="results JSON (default: lm_eval_<model>_step<N>.json next to the checkpoint)")
    harness.add_argument("--log-samples", action="store_true", help="keep every document's answers in the JSON")
    ev.set_defaults(func=cmd_eval)


def add_generate(sub) -> None:
    gen = sub.add_parser("generate", help="continue a prompt with a trained checkpoint (streams to stdout)")
    checkpoint_arg(gen)
    gen.add_argument("--prompt", required=True)
    _sampling_flags(gen)
    gen.add_argument("--stop", action="append", metavar="TEXT",
                     help="stop before this text (repeatable); \\n and \\t are a newline and a tab: --stop '\\n' ends"
                          " at the end of the line")
    gen.set_defaults(func=cmd_generate)


def add_chat(sub) -> None:
    chat = sub.add_parser("chat", help="interactive chat with a trained model (/help inside)")
    checkpoint_arg(chat, optional=True)
    _sampling_flags(chat)
    chat.set_defaults(func=cmd_chat)
