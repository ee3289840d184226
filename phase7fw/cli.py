"""The ``phase7fw`` command line. Argument parsing only: every command calls the Engine/API.

Bad input of any kind ends in one ``error: ...`` message on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from phase7fw import __version__
from phase7fw.errors import Phase7Error


_LOADED = None


def _report(err) -> None:
    print(f"warning: plugin {err.name} failed and is disabled: {err}", file=sys.stderr)


def _plugins():
    """Plugins of this process, loaded once; a failing plugin is a warning line (an error
    when strict), here and whenever one of its hooks fails later."""
    global _LOADED
    if _LOADED is None:
        from phase7fw.plugins import load_plugins

        _LOADED = load_plugins(report=_report)
    return _LOADED


def _plugin_commands(plugins):
    """The ``register_commands`` hook: a plugin that fails in it loses the commands it added."""
    from phase7fw.plugins import CURRENT_PLUGIN

    def call(subparsers):
        owners: dict[str, str] = {}
        add_parser = subparsers.add_parser

        def add(name, **kwargs):
            owners[name] = CURRENT_PLUGIN.get()
            return add_parser(name, **kwargs)

        subparsers.add_parser = add
        before = len(plugins.load_errors)
        try:
            plugins.call("register_commands", subparsers=subparsers)
        finally:
            subparsers.add_parser = add_parser
        failed = {e.name for e in plugins.load_errors[before:]}
        for name, owner in owners.items():
            if owner in failed:
                subparsers.choices.pop(name, None)
                subparsers._choices_actions[:] = [a for a in subparsers._choices_actions if a.dest != name]

    return call


def _recipe(args, plugins):
    from phase7fw.recipe import load_recipe

    return load_recipe(args.recipe, args.set or None, plugins=plugins)


# ---------------------------------------------------------------------- commands
def cmd_run(args) -> int:
    from phase7fw.engine import Engine

    plugins = _plugins()
    engine = Engine(_recipe(args, plugins), plugins=plugins, dummy_data=args.dummy_data, resume=args.resume,
                    device=args.device, allow_cpu=args.allow_cpu)
    summary = engine.fit()
    if not engine.dist.is_main:
        return 0
    print(done_line(summary))
    return 0


def done_line(summary: dict) -> str:
    """The last line of ``phase7fw run``: every loss says what it is."""
    if summary.get("already_complete"):
        return (f"{summary['output_dir']}: already complete at step {summary['steps']} (train.max_steps ="
                f" {summary['max_steps']}); nothing was trained or written. Raise train.max_steps to continue"
                f" (--set train.max_steps=N), or start a new run with --resume never --set run.output_dir=DIR")
    parts = [f"Done: {summary['steps']} steps"]
    logged, span = summary.get("last_logged_loss"), summary.get("last_logged_steps")
    if logged is not None and span:
        first, last = span
        parts.append(f"train loss {logged:.4f} (mean of step{'s' if last > first else ''}"
                     f" {first}{'-' + str(last) if last > first else ''})")
    if summary.get("final_loss") is not None:
        parts.append(f"last step's loss {summary['final_loss']:.4f}")
    for key, label in (("final_val", "val loss"), ("best_val", "best val loss")):
        loss, bpb = summary.get(f"{key}_loss"), summary.get(f"{key}_bpb")
        if loss is not None:
            parts.append(f"{label} {loss:.4f}" + (f" ({bpb:.4f} bits per byte)" if bpb is not None else ""))
    return " | ".join(parts) + f"; checkpoint {summary['final_checkpoint']}"


def cmd_recipe(args) -> int:
    from phase7fw.recipe import recipe_to_toml

    if args.action == "new":
        from phase7fw.wizard import cmd_new

        return cmd_new(args, _plugins())
    if not args.recipe:
        raise Phase7Error(f"phase7fw recipe {args.action} needs a RECIPE file")
    plugins = _plugins()
    recipe = _recipe(args, plugins)
    if args.action == "show":
        print(recipe_to_toml(recipe), end="")
    else:
        from phase7fw.engine import check_buildable

        check_buildable(recipe, plugins)  # what run builds before data and device: model, optimizer, ...
        print(f"{args.recipe}: valid (model {recipe.model.name}, {recipe.train.max_steps} steps)")
    return 0


def cmd_data(args) -> int:
    """Tokenize every source of the recipe into the cache (idempotent: a second run finds it)."""
    from phase7fw.data import load_mix
    from phase7fw.engine import build_tokenizer, cache_dir

    plugins = _plugins()
    recipe = _recipe(args, plugins)
    if args.workers is not None and args.workers < 1:
        raise Phase7Error(f"--workers must be >= 1, got {args.workers}")
    tokenizer = build_tokenizer(recipe, plugins)
    sources = load_mix(recipe, plugins.registry, tokenizer, cache_dir=cache_dir(recipe), workers=args.workers,
                       log=print)
    train, val = sum(len(s.train) for s in sources), sum(len(s.val) for s in sources)
    print(f"ready: {len(sources)} source(s), {train:,} train + {val:,} val tokens, tokenizer"
          f" {recipe.data.tokenizer.name} (vocab {tokenizer.vocab_size}), cache {cache_dir(recipe)}")
    return 0


def cmd_plugins(args) -> int:
    plugins = _plugins()
    rows = plugins.describe()
    errors = [{"name": e.name, "dist": e.dist, "hook": e.hook, "error": e.reason} for e in plugins.load_errors]
    if args.json:
        print(json.dumps({"plugins": rows, "errors": errors}, indent=2))
        return 0
    for row in rows:
        kind = "built-in" if row["builtin"] else row["dist"]
        print(f"{row['name']} ({kind}, {row['version']}): {', '.join(row['components']) or '-'}")
    for err in plugins.load_errors:
        print(f"FAILED {err.name} ({err}), disabled")
    return 0


def cmd_components(args) -> int:
    from phase7fw.registry import KINDS

    registry = _plugins().registry
    if args.kind and args.kind not in KINDS:
        raise Phase7Error(f"unknown kind {args.kind!r}; kinds are: {', '.join(KINDS)}")
    entries = registry.entries(args.kind)
    if args.json:
        print(json.dumps([{"kind": e.kind, "name": e.name, "plugin": e.plugin, "description": e.description,
                           "config": e.config_fields()} for e in entries], indent=2))
        return 0
    for e in entries:
        print(f"{e.kind}:{e.name}  [{e.plugin}]  {e.description}")
        for f in e.config_fields():
            print(f"    {f['name']}: {f['type']} = {f['default']}" + (f"  # {f['help']}" if f["help"] else ""))
    return 0


def cmd_doctor(args) -> int:
    from phase7fw.doctor import run_doctor

    return run_doctor(require_gpu=args.require_gpu, verify=args.verify)


def cmd_eval(args) -> int:
    from phase7fw.chat import find_checkpoint
    from phase7fw.engine import Engine

    if args.batches is not None and args.batches < 1:  # before the model and the data load
        raise Phase7Error(f"--batches must be >= 1, got {args.batches}")
    path = find_checkpoint(args.checkpoint, args.runs_dir)
    if args.tasks:
        return _eval_tasks(args, path)
    engine = Engine.from_checkpoint(path, device=args.device, with_data=True, plugins=_plugins())
    m = engine.evaluate(args.batches)
    bpb = f" | bpb {m['bpb']:.4f}" if m.get("bpb") is not None else ""
    print(f"{path} (step {engine.step}): val loss {m['loss']:.4f} | ppl {m['ppl']:.2f}{bpb}"
          f" | {m['tokens']:,} tokens")
    if args.json:
        print(json.dumps({"checkpoint": str(path), "step": engine.step, **m}))
    return 0


def _eval_tasks(args, path) -> int:
    """``eval --tasks``: lm-evaluation-harness on the checkpoint (phase7fw/lm_harness.py)."""
    from pathlib import Path

    from phase7fw.engine import Engine
    from phase7fw.lm_harness import load_tasks, results_table, run_tasks

    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if args.limit is not None and args.limit <= 0:
        raise Phase7Error(f"--limit must be > 0, got {args.limit}")
    load_tasks(names, args.include_path or [])  # bad names / unreachable datasets before the model loads
    engine = Engine.from_checkpoint(path, device=args.device, plugins=_plugins())
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
    from phase7fw.generation import SamplingParams

    return SamplingParams(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.repetition_penalty,
                          args.seed).checked()


def _inference_engine(args):
    """The engine of the checkpoint (or run folder) in ``args``, weights in the training
    precision on a GPU (fast decoding)."""
    from phase7fw.chat import find_checkpoint, load_for_inference

    path = find_checkpoint(args.checkpoint, args.runs_dir)
    return path, load_for_inference(path, device=args.device, plugins=_plugins())


def cmd_generate(args) -> int:
    params = _sampling(args)  # bad settings fail before the model loads
    _, engine = _inference_engine(args)
    if args.cuda_graph == "on":  # its errors before the prompt is echoed
        engine.decoder(use_cache=not args.no_cache, cuda_graph="on")

    def stream(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    stream(args.prompt)
    stop = [unescape(t) for t in args.stop or []] or None
    engine.generate(args.prompt, max_new_tokens=params.max_new_tokens, temperature=params.temperature,
                    top_k=params.top_k, top_p=params.top_p, repetition_penalty=params.repetition_penalty,
                    seed=params.seed, use_cache=not args.no_cache, stop=stop, on_text=stream,
                    cuda_graph=args.cuda_graph)
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
    from phase7fw.chat import run_chat

    params = _sampling(args)
    path, engine = _inference_engine(args)
    return run_chat(engine, params, use_cache=not args.no_cache, cuda_graph=args.cuda_graph, label=str(path))


def cmd_bench(args) -> int:
    from phase7fw.bench import report_lines, run_bench
    from phase7fw.recipe import load_recipe, parse_set

    def overrides(items) -> dict:
        out = dict(parse_set(item) for item in items or [])
        if args.batch_size is not None:
            out["train.batch_size"] = args.batch_size
        if args.grad_accum is not None:
            out["train.grad_accum_steps"] = args.grad_accum
        return out

    if args.steps < 1 or args.warmup < 0 or args.gen_tokens < 1:
        raise Phase7Error("bench: --steps and --gen-tokens must be >= 1 and --warmup >= 0")
    main_over, base_over = overrides(args.set), overrides(args.compare_set)
    plugins = _plugins()
    load_recipe(args.recipe, main_over, plugins=plugins)  # every recipe error before any work
    if args.compare:
        load_recipe(args.compare, base_over, plugins=plugins)
    def write_json(result: dict) -> None:
        if args.json:
            from phase7fw.fileio import write_text_atomic

            write_text_atomic(args.json, json.dumps(result, indent=2) + "\n")

    result = run_bench(args.recipe, main_over, steps=args.steps, warmup=args.warmup, device=args.device,
                       compare_recipe=args.compare, compare_overrides=base_over,
                       memory_cap_gib=args.memory_cap_gib, find_max_params=args.max_params, search=args.search,
                       generate=args.generate, gen_tokens=args.gen_tokens, cuda_graph=args.cuda_graph,
                       profile_dir=args.profile, plugins=plugins, allow_cpu=args.allow_cpu,
                       progress=lambda text: print(text, file=sys.stderr, flush=True), partial=write_json)
    print("\n".join(report_lines(result)))
    write_json(result)
    if args.json:
        print(f"wrote {args.json}")
    return 0


def cmd_checkpoint(args) -> int:
    from phase7fw.checkpoint import consolidate

    out = consolidate(args.src, args.out)
    print(f"wrote {out} (one file: eval, generate, chat and single-process runs load it)")
    return 0


def cmd_export(args) -> int:
    from phase7fw.hf_export import export_checkpoint

    export_checkpoint(args.checkpoint, args.output, dtype=args.dtype, force=args.force, check=args.check,
                      plugins=_plugins())
    return 0


def cmd_import_hf(args) -> int:
    from phase7fw.hf_export import import_folder

    import_folder(args.folder, args.output, plugins=_plugins())
    return 0


def cmd_later(feature: str, issue: str):
    def run(args) -> int:
        print(f"error: {feature} is not in this version yet ({issue}).", file=sys.stderr)
        return 2

    return run


# ---------------------------------------------------------------------- parser
def build_parser(plugins_hook=None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="phase7fw", description="Train hybrid hyperbolic-attention language models.")
    p.add_argument("--version", action="version", version=f"phase7fw {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_set(sp):
        sp.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="override a recipe key (VALUE is TOML: 20, 3e-4, true, \"text\", [1, 2])")

    run = sub.add_parser("run", help="train a recipe")
    run.add_argument("recipe")
    with_set(run)
    run.add_argument("--resume", default="auto", metavar="auto|latest|never|PATH",
                     help="auto: continue from the newest checkpoint in run.output_dir if there is one, else start"
                          " (default); latest: continue from it, an error if there is none; never: start, an error"
                          " if checkpoints exist; PATH: continue from that checkpoint")
    run.add_argument("--dummy-data", action="store_true", help="train on random tokens (checks the machinery)")
    run.add_argument("--device", default=None, help="override train.device")
    run.add_argument("--allow-cpu", action="store_true",
                     help="train a GPU-sized recipe on the CPU anyway (by default it stops with an estimate)")
    run.set_defaults(func=cmd_run)

    rec = sub.add_parser("recipe", help="validate, show or create recipes")
    rec.add_argument("action", choices=["validate", "show", "new"])
    rec.add_argument("recipe", nargs="?", help="the recipe file (for new: where to write it, like --output)")
    with_set(rec)
    new = rec.add_argument_group("recipe new (see docs/data.md)")
    new.add_argument("--preset", metavar="NAME|FILE", help="model preset: a recipe in recipes/ (phase7_small) or a .toml")
    new.add_argument("--source", action="append", metavar="NAME[:KEY=VALUE]...[:WEIGHT]",
                     help="a data source of the mix, repeatable (python_stdlib:1.0, text_files:paths=data/*.txt:0.5)")
    new.add_argument("--tokenizer", metavar="NAME[:KEY=VALUE]...", help="tokenizer (bpe:vocab_size=8192); default: the preset's")
    new.add_argument("--tokens", metavar="N", help="token budget (50M, 1.5B) -> train.max_steps; default: the preset's steps")
    new.add_argument("--output", "-o", metavar="FILE", help="where to write the recipe")
    new.add_argument("--force", action="store_true", help="overwrite --output if it exists")
    new.add_argument("--interactive", action="store_true", help="ask the missing answers even when stdin is not a terminal")
    rec.set_defaults(func=cmd_recipe)

    data = sub.add_parser("data", help="data preparation")
    data.add_argument("action", choices=["prepare"])
    data.add_argument("recipe")
    with_set(data)
    data.add_argument("--workers", type=int, default=None, metavar="N",
                      help="tokenizer processes (default: every core)")
    data.set_defaults(func=cmd_data)

    pl = sub.add_parser("plugins", help="list loaded plugins and what they register")
    pl.add_argument("--json", action="store_true")
    pl.set_defaults(func=cmd_plugins)

    co = sub.add_parser("components", help="list registered components and their recipe options")
    co.add_argument("kind", nargs="?")
    co.add_argument("--json", action="store_true")
    co.set_defaults(func=cmd_components)

    doc = sub.add_parser("doctor", help="check the environment (versions, GPU, kernels)")
    doc.add_argument("--verify", action="store_true", help="check every kernel against its reference on the GPU")
    doc.add_argument("--require-gpu", action="store_true", help="exit 1 when no CUDA GPU is usable")
    doc.set_defaults(func=cmd_doctor)

    def checkpoint_arg(sp, optional=False):
        sp.add_argument("checkpoint", nargs="?" if optional else None, metavar="CHECKPOINT|RUN_DIR",
                        help="a checkpoint file, or a run folder (best > final > latest step)"
                        + (", or nothing: the newest run under --runs-dir" if optional else ""))
        sp.add_argument("--runs-dir", default="runs", help="where to look for runs (default: runs)")
        sp.add_argument("--device", default=None, help="override train.device")

    def cuda_graph_flag(sp):
        sp.add_argument("--cuda-graph", choices=["auto", "on", "off"], default="auto",
                        help="decode with the static step captured in a CUDA graph (auto, the default: on a"
                             " CUDA device when the model has one, else the dynamic cached path, said in one"
                             " line; on: required; off: the dynamic cached path)")

    def sampling_flags(sp):
        sp.add_argument("--max-new-tokens", type=int, default=64)
        sp.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
        sp.add_argument("--top-k", type=int, default=None)
        sp.add_argument("--top-p", type=float, default=None)
        sp.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats")
        sp.add_argument("--seed", type=int, default=None)
        sp.add_argument("--no-cache", action="store_true", help="recompute the context for every token (slow)")
        cuda_graph_flag(sp)

    ck = sub.add_parser("checkpoint", help="checkpoint tools")
    ck_sub = ck.add_subparsers(dest="action", required=True, metavar="ACTION")
    cons = ck_sub.add_parser("consolidate", help="sharded (FSDP) checkpoint directory -> one file")
    cons.add_argument("src")
    cons.add_argument("out")
    cons.set_defaults(func=cmd_checkpoint)

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

    exp = sub.add_parser("export", help="write a Hugging Face model folder (config.json, model.safetensors, tokenizer)")
    exp.add_argument("checkpoint", metavar="CHECKPOINT|RUN_DIR",
                     help="a checkpoint file, a run folder (best > final > latest step) or a sharded FSDP checkpoint")
    exp.add_argument("--output", "-o", required=True, metavar="DIR", help="the folder to write")
    exp.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="weights in model.safetensors")
    exp.add_argument("--force", action="store_true", help="replace DIR if it exists")
    exp.add_argument("--check", action="store_true",
                     help="load the folder with transformers and compare its logits with phase7fw's (fp32)")
    exp.set_defaults(func=cmd_export)

    imp = sub.add_parser("import-hf", help="a folder written by phase7fw export -> a checkpoint that resumes and"
                                           " fine-tunes")
    imp.add_argument("folder", metavar="DIR")
    imp.add_argument("--output", "-o", required=True, metavar="CHECKPOINT.pt")
    imp.set_defaults(func=cmd_import_hf)

    gen = sub.add_parser("generate", help="continue a prompt with a trained checkpoint (streams to stdout)")
    checkpoint_arg(gen)
    gen.add_argument("--prompt", required=True)
    sampling_flags(gen)
    gen.add_argument("--stop", action="append", metavar="TEXT",
                     help="stop before this text (repeatable); \\n and \\t are a newline and a tab: --stop '\\n' ends"
                          " at the end of the line")
    gen.set_defaults(func=cmd_generate)

    chat = sub.add_parser("chat", help="interactive chat with a trained model (/help inside)")
    checkpoint_arg(chat, optional=True)
    sampling_flags(chat)
    chat.set_defaults(func=cmd_chat)

    bench = sub.add_parser("bench", help="throughput / MFU / memory / decoding benchmark of a recipe")
    bench.add_argument("recipe")
    with_set(bench)
    bench.add_argument("--steps", type=int, default=10, help="timed training steps (default 10)")
    bench.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation; default 3)")
    bench.add_argument("--batch-size", type=int, default=None, help="train.batch_size of every benchmarked recipe")
    bench.add_argument("--grad-accum", type=int, default=None, help="train.grad_accum_steps of every recipe")
    bench.add_argument("--compare", metavar="RECIPE", help="baseline recipe measured in the same process")
    bench.add_argument("--compare-set", action="append", metavar="KEY=VALUE", help="override for the baseline")
    bench.add_argument("--memory-cap-gib", type=float, default=None,
                       help="emulate a GPU with this much memory (set_per_process_memory_fraction)")
    bench.add_argument("--max-params", action="store_true",
                       help="search the largest model of the recipe's family that trains under the cap")
    bench.add_argument("--search", choices=["layers", "width"], default="layers", help="what --max-params grows")
    bench.add_argument("--generate", action="store_true", help="also time cached decoding (batch 1)")
    bench.add_argument("--gen-tokens", type=int, default=64, help="tokens decoded by --generate")
    cuda_graph_flag(bench)
    bench.add_argument("--json", metavar="PATH", help="write every number to this JSON file")
    bench.add_argument("--profile", metavar="DIR", default=None,
                       help="after the timed steps, profile 2 more (torch.profiler): a Chrome trace and an ops table"
                            " per recipe in DIR")
    bench.add_argument("--device", default=None)
    bench.add_argument("--allow-cpu", action="store_true", help="benchmark a GPU-sized recipe on the CPU anyway")
    bench.set_defaults(func=cmd_bench)

    if plugins_hook is not None:
        plugins_hook(subparsers=sub)
    return p


def _torch_missing() -> str | None:
    """Every command needs torch (the built-in components are torch modules): without it, one
    message instead of a warning per plugin and a traceback."""
    try:
        import torch  # noqa: F401
    except ImportError as exc:
        return (f"torch is not installed for {sys.executable} ({exc}); install it: pip install torch==2.13.0"
                " (the CPU build), or the torch build for your CUDA from pytorch.org")
    return None


def main(argv: list[str] | None = None) -> int:
    global _LOADED
    argv = sys.argv[1:] if argv is None else argv
    _LOADED = None
    from phase7fw.threads import prepare_environment

    prepare_environment()  # before torch is imported (by plugins or the command)
    # Under torchrun every message names its rank; torchrun stops the other ranks when one exits.
    world = int(os.environ.get("WORLD_SIZE", "1"))
    who = f"[rank {os.environ.get('RANK', '0')}/{world}] " if world > 1 else ""
    if not {"-h", "--help", "--version"} & set(argv) and (missing := _torch_missing()):
        print(f"error: {who}{missing}", file=sys.stderr)
        return 2
    clean = False  # the command returned (every rank got there): leave the process group together
    try:
        args = build_parser(_plugin_commands(_plugins())).parse_args(argv)
        code = int(args.func(args) or 0)
        clean = True
        return code
    except Phase7Error as exc:
        print(f"error: {who}{exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"{who}interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (phase7fw components | head): not an error of ours. Point
        # stdout at /dev/null so the interpreter's final flush does not fail again.
        from phase7fw.console import silence_stdout

        silence_stdout()
        return 0
    except Exception:
        if not who:
            raise
        import traceback

        traceback.print_exc()
        print(f"error: {who}failed (traceback above); the job stops", file=sys.stderr)
        return 1
    finally:
        if who:
            from phase7fw.distributed import shutdown

            shutdown(wait_for_peers=clean)


if __name__ == "__main__":
    sys.exit(main())
