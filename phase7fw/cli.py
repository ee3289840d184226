"""The ``phase7fw`` command line. Argument parsing only: every command calls the Engine/API.

Bad input of any kind ends in one ``error: ...`` message on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys

from phase7fw import __version__
from phase7fw.errors import Phase7Error


_LOADED = None


def _plugins():
    """Plugins of this process, loaded once; load failures are warnings (errors when strict)."""
    global _LOADED
    if _LOADED is None:
        from phase7fw.plugins import load_plugins

        _LOADED = load_plugins()
        for err in _LOADED.load_errors:
            print(f"warning: plugin {err.name} failed to load: {err}", file=sys.stderr)
    return _LOADED


def _recipe(args, plugins):
    from phase7fw.recipe import load_recipe

    return load_recipe(args.recipe, args.set or None, plugins=plugins)


# ---------------------------------------------------------------------- commands
def cmd_run(args) -> int:
    from phase7fw.engine import Engine

    plugins = _plugins()
    engine = Engine(_recipe(args, plugins), plugins=plugins, dummy_data=args.dummy_data, resume=args.resume,
                    device=args.device)
    summary = engine.fit()
    best = summary["best_val_loss"]
    print(f"Done: {summary['steps']} steps, final loss {summary['final_loss']:.4f}"
          + (f", best val loss {best:.4f}" if best is not None else "")
          + f"; checkpoint {summary['final_checkpoint']}")
    return 0


def cmd_recipe(args) -> int:
    from phase7fw.recipe import recipe_to_toml

    if args.action == "new":
        print("error: the interactive data-mix wizard (phase7fw recipe new) is not in this version yet;"
              " start from a file in recipes/ and see docs/recipes.md", file=sys.stderr)
        return 2
    if not args.recipe:
        raise Phase7Error(f"phase7fw recipe {args.action} needs a RECIPE file")
    recipe = _recipe(args, _plugins())
    if args.action == "show":
        print(recipe_to_toml(recipe), end="")
    else:
        print(f"{args.recipe}: valid (model {recipe.model.name}, {recipe.train.max_steps} steps)")
    return 0


def cmd_data(args) -> int:
    from phase7fw.engine import Engine

    plugins = _plugins()
    recipe = _recipe(args, plugins)
    engine = Engine(recipe, plugins=plugins, resume="never", device="cpu")
    for s in engine.sources:
        print(f"{s.label}: {len(s.train):,} train + {len(s.val):,} val tokens (weight {s.weight:g})")
    return 0


def cmd_plugins(args) -> int:
    plugins = _plugins()
    rows = plugins.describe()
    errors = [{"name": e.name, "dist": e.dist, "error": f"{type(e.error).__name__}: {e.error}"}
              for e in plugins.load_errors]
    if args.json:
        print(json.dumps({"plugins": rows, "errors": errors}, indent=2))
        return 0
    for row in rows:
        kind = "built-in" if row["builtin"] else row["dist"]
        print(f"{row['name']} ({kind}, {row['version']}): {', '.join(row['components']) or '-'}")
    for err in errors:
        print(f"FAILED {err['name']} ({err['dist']}): {err['error']}")
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
    from phase7fw.engine import Engine

    engine = Engine.from_checkpoint(args.checkpoint, device=args.device, with_data=True, plugins=_plugins())
    m = engine.evaluate(args.batches)
    print(f"{args.checkpoint} (step {engine.step}): val loss {m['loss']:.4f} | ppl {m['ppl']:.2f}"
          f" | {m['tokens']:,} tokens")
    return 0


def cmd_generate(args) -> int:
    from phase7fw.engine import Engine

    engine = Engine.from_checkpoint(args.checkpoint, device=args.device, plugins=_plugins())
    text = engine.generate(args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                           top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                           seed=args.seed)
    print(args.prompt + text)
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
    run.add_argument("--resume", default="auto", metavar="auto|never|PATH",
                     help="auto: continue from the newest checkpoint in run.output_dir (default)")
    run.add_argument("--dummy-data", action="store_true", help="train on random tokens (checks the machinery)")
    run.add_argument("--device", default=None, help="override train.device")
    run.set_defaults(func=cmd_run)

    rec = sub.add_parser("recipe", help="validate, show or create recipes")
    rec.add_argument("action", choices=["validate", "show", "new"])
    rec.add_argument("recipe", nargs="?")
    with_set(rec)
    rec.set_defaults(func=cmd_recipe)

    data = sub.add_parser("data", help="data preparation")
    data.add_argument("action", choices=["prepare"])
    data.add_argument("recipe")
    with_set(data)
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

    ev = sub.add_parser("eval", help="validation loss and perplexity of a checkpoint")
    ev.add_argument("checkpoint")
    ev.add_argument("--batches", type=int, default=None)
    ev.add_argument("--device", default=None)
    ev.set_defaults(func=cmd_eval)

    gen = sub.add_parser("generate", help="continue a prompt with a trained checkpoint")
    gen.add_argument("checkpoint")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.8)
    gen.add_argument("--top-k", type=int, default=None)
    gen.add_argument("--top-p", type=float, default=None)
    gen.add_argument("--repetition-penalty", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--device", default=None)
    gen.set_defaults(func=cmd_generate)

    chat = sub.add_parser("chat", help="interactive chat with a trained model")
    chat.add_argument("checkpoint", nargs="?")
    chat.set_defaults(func=cmd_later("phase7fw chat", "use phase7fw generate meanwhile"))

    bench = sub.add_parser("bench", help="throughput / MFU / memory benchmark of a recipe")
    bench.add_argument("recipe")
    bench.set_defaults(func=cmd_later("phase7fw bench", "see benchmarks/ meanwhile"))

    if plugins_hook is not None:
        plugins_hook(subparsers=sub)
    return p


def main(argv: list[str] | None = None) -> int:
    global _LOADED
    argv = sys.argv[1:] if argv is None else argv
    _LOADED = None
    try:
        args = build_parser(_plugins().hook.register_commands).parse_args(argv)
        return int(args.func(args) or 0)
    except Phase7Error as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
