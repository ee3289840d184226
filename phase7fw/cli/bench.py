"""``phase7fw bench``: arguments and report; the measurements are in :mod:`.benchmark`."""

from __future__ import annotations

import json
import sys

from phase7fw.cli.common import cuda_graph_flag, plugins, with_set
from phase7fw.errors import Phase7Error


def cmd_bench(args) -> int:
    from phase7fw.cli.benchmark import report_lines, run_bench
    from phase7fw.fileio import write_text_atomic
    from phase7fw.recipe import load_recipe, parse_set

    def overrides(items) -> dict:
        out = dict(parse_set(item) for item in items or [])
        if args.batch_size is not None:
            out["train.batch_size"] = args.batch_size
        if args.grad_accum is not None:
            out["train.grad_accum_steps"] = args.grad_accum
        return out

    if args.steps < 1 or args.repeat < 1 or args.warmup < 0 or args.gen_tokens < 1:
        raise Phase7Error("bench: --steps, --repeat and --gen-tokens must be >= 1 and --warmup >= 0")
    main_over, base_over = overrides(args.set), overrides(args.compare_set)
    loaded = plugins()
    load_recipe(args.recipe, main_over, plugins=loaded)  # every recipe error before any work
    if args.compare:
        load_recipe(args.compare, base_over, plugins=loaded)

    def write_json(result: dict) -> None:
        if args.json:
            write_text_atomic(args.json, json.dumps(result, indent=2) + "\n")

    result = run_bench(args.recipe, main_over, steps=args.steps, warmup=args.warmup, repeat=args.repeat,
                       device=args.device,
                       compare_recipe=args.compare, compare_overrides=base_over,
                       memory_cap_gib=args.memory_cap_gib, find_max_params=args.max_params, search=args.search,
                       generate=args.generate, gen_tokens=args.gen_tokens, cuda_graph=args.cuda_graph,
                       compile_step=args.compile_step, int8=args.int8,
                       profile_dir=args.profile, plugins=loaded, allow_cpu=args.allow_cpu,
                       progress=lambda text: print(text, file=sys.stderr, flush=True), partial=write_json)
    print("\n".join(report_lines(result)))
    write_json(result)
    if args.json:
        print(f"wrote {args.json}")
    return 0


def add_bench(sub) -> None:
    bench = sub.add_parser("bench", help="throughput / MFU / memory / decoding benchmark of a recipe")
    bench.add_argument("recipe")
    with_set(bench)
    bench.add_argument("--steps", type=int, default=10, help="timed training steps (default 10)")
    bench.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation; default 3)")
    bench.add_argument("--repeat", type=int, default=1,
                       help="time N windows of --steps steps back to back (one compilation) and report their mean"
                            " and spread (default 1)")
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
    bench.add_argument("--int8", action="store_true",
                       help="--generate with int8 weight-only decoding (the blocks' linear layers; docs/generation.md)")
    cuda_graph_flag(bench)
    bench.add_argument("--json", metavar="PATH", help="write every number to this JSON file")
    bench.add_argument("--profile", metavar="DIR", default=None,
                       help="after the timed steps, profile 2 more (torch.profiler): a Chrome trace and an ops table"
                            " per recipe in DIR")
    bench.add_argument("--device", default=None)
    bench.add_argument("--allow-cpu", action="store_true", help="benchmark a GPU-sized recipe on the CPU anyway")
    bench.set_defaults(func=cmd_bench)
