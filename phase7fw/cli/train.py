"""``phase7fw run``, ``phase7fw recipe validate|show|new`` and ``phase7fw data prepare``."""

from __future__ import annotations

from phase7fw.cli.common import plugins, recipe, with_set
from phase7fw.errors import Phase7Error


def cmd_run(args) -> int:
    from phase7fw.core.engine import Engine

    loaded = plugins()
    engine = Engine(recipe(args, loaded), plugins=loaded, dummy_data=args.dummy_data, resume=args.resume,
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
        from phase7fw.cli.wizard import cmd_new

        return cmd_new(args, plugins())
    if not args.recipe:
        raise Phase7Error(f"phase7fw recipe {args.action} needs a RECIPE file")
    loaded = plugins()
    built = recipe(args, loaded)
    if args.action == "show":
        print(recipe_to_toml(built), end="")
    else:
        from phase7fw.core.engine import check_buildable

        check_buildable(built, loaded)  # what run builds before data and device: model, optimizer, ...
        print(f"{args.recipe}: valid (model {built.model.name}, {built.train.max_steps} steps)")
    return 0


def cmd_data(args) -> int:
    """Tokenize every source of the recipe into the cache (idempotent: a second run finds it)."""
    from phase7fw.core.build import build_tokenizer, cache_dir
    from phase7fw.data.mixture import load_mix

    loaded = plugins()
    built = recipe(args, loaded)
    if args.workers is not None and args.workers < 1:
        raise Phase7Error(f"--workers must be >= 1, got {args.workers}")
    tokenizer = build_tokenizer(built, loaded)
    sources = load_mix(built, loaded.registry, tokenizer, cache_dir=cache_dir(built), workers=args.workers,
                       log=print)
    train, val = sum(len(s.train) for s in sources), sum(len(s.val) for s in sources)
    print(f"ready: {len(sources)} source(s), {train:,} train + {val:,} val tokens, tokenizer"
          f" {built.data.tokenizer.name} (vocab {tokenizer.vocab_size}), cache {cache_dir(built)}")
    return 0


def add_run(sub) -> None:
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


def add_recipe(sub) -> None:
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


def add_data(sub) -> None:
    data = sub.add_parser("data", help="data preparation")
    data.add_argument("action", choices=["prepare"])
    data.add_argument("recipe")
    with_set(data)
    data.add_argument("--workers", type=int, default=None, metavar="N",
                      help="tokenizer processes (default: every core)")
    data.set_defaults(func=cmd_data)
