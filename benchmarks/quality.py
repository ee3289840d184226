"""Quality benchmark: validation loss of several recipes at equal data, tokens, seed and schedule.

    python benchmarks/quality.py                         # recipes/quality/*_100m*.toml (GPU)
    python benchmarks/quality.py A.toml B.toml --seeds 0 1 2 --jobs 2 --out runs/quality
    python benchmarks/quality.py --setting tiny          # CPU smoke test (tiny models, a few steps)
    python benchmarks/quality.py --report runs/quality/quality.json   # re-render the report
    python benchmarks/quality.py --report a/quality.json b/quality.json --out runs/merged   # merge calls

Each recipe x seed trains in its own process (``--jobs`` at a time on the same device) from the
recipe's own settings, plus ``--set`` overrides and ``--steps``. The recipes of recipes/quality/
share one data mix, tokenizer, schedule and batch (common.toml), so their validation losses
compare at equal tokens. Written to ``--out``: quality.json (every curve), quality.md (tables)
and quality.png (validation loss against tokens and against training time; needs matplotlib).

Reported per recipe: parameters, validation loss (nats per token) at a third of the run and at
its end, bits per byte at the end (loss / ln 2 x tokens / bytes of the validation text, so
models with different tokenizers compare), the best validation loss and where it was, the
training loss over the last tenth of the steps (with the best loss: overfitting shows), tokens/s,
and the validation loss at equal wall clock: at the training time of the fastest recipe,
interpolated linearly between evaluations. With ``--jobs`` > 1 the runs share the device, so
their own training times compare nothing: ``--speed-steps N`` then times each recipe alone
afterwards (N steps, one recipe at a time) and puts the equal-wall-clock column on those
speeds (each evaluation at tokens / solo tokens/s); the report says which it used.
With ``--set 'callbacks=[{name="diagnostics", every=500}]'`` the runs log per-layer
statistics and the report adds the mixer gate's mean per layer (the attention path's share) at
the first and last diagnostics step.
Training time excludes evaluation.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RECIPES = sorted(glob.glob(str(ROOT / "recipes" / "quality" / "*_100m*.toml")))
BASELINE = "llama"  # the first recipe whose name contains this is the reference row

#: --setting tiny: overrides that shrink every recipe to a CPU smoke test (applied where the
#: recipe has the table: llama has no [model.ssm]).
TINY = {
    "model.d_model": 64, "model.n_heads": 2, "model.seq_len": 64, "model.n_layers": 2, "model.ffn_hidden": 128,
    "model.attention.window": 32, "model.ssm.n_heads": 2, "model.ssm.chunk_size": 16,
    "model.embedding.rank": 8, "curvature_scheduler.warmup_steps": 4,
    "train.max_steps": 8, "train.eval_every": 4, "train.eval_batches": 2, "train.batch_size": 4,
    "train.log_every": 4, "train.compile": False, "train.precision": "fp32", "lr_scheduler.warmup_steps": 2,
    "kernels.hyperbolic_attention": "reference", "kernels.ar_ssm_scan": "reference",
    "data.sources": [{"name": "python_stdlib", "weight": 1.0, "max_files": 20}],
}


# ----------------------------------------------------------------------------- worker
def worker(spec: dict) -> dict:
    """Train one recipe (in this process) and return its curves."""
    import torch

    from phase7fw import Engine

    engine = Engine.from_recipe(spec["recipe"], spec["overrides"], resume="never", quiet=spec.get("quiet", True))
    device = engine.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    summary = engine.fit()
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in (engine.output_dir / "training_log.jsonl").read_text().splitlines()]
    val = [{k: r[k] for k in ("step", "tokens", "train_seconds", "loss")} for r in rows if r.get("split") == "val"]
    train = [{k: r.get(k) for k in ("step", "tokens", "train_seconds", "loss", "tokens_per_s")}
             for r in rows if r.get("split") == "train" and not r.get("skipped")]
    # tokens/s of the second half of the run: compilation and warm-up excluded
    tail = [r for r in train if r["step"] > engine.step // 2] or train
    tok_s = sum(r["tokens_per_s"] for r in tail) / len(tail) if tail else None
    return {
        "recipe": spec["recipe"], "name": spec["name"], "seed": spec["seed"],
        "params": sum(p.numel() for p in engine.model.parameters()),
        "breakdown": engine.model.parameter_breakdown(),
        "bytes_per_token": val_bytes_per_token(engine),
        "val": val, "train": train, "final_val_loss": summary.get("final_val_loss"),
        # per-layer statistics, when the run has [[callbacks]] name = "diagnostics" (--set callbacks=...)
        "diag": [r for r in rows if r.get("split") == "diag"],
        "tokens": summary.get("tokens"), "train_seconds": val[-1]["train_seconds"] if val else None,
        "tokens_per_s": tok_s, "wall_s": wall,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
    }


def val_bytes_per_token(engine) -> float:
    """UTF-8 bytes per token of the evaluation batches' targets (1.0 for byte tokens)."""
    n_tok = n_bytes = 0
    for i in range(engine.recipe.train.eval_batches):
        _, y = engine.val_sampler.batch(i)
        for row in y.tolist():
            n_tok += len(row)
            n_bytes += len(engine.tokenizer.decode(row).encode("utf-8", errors="replace"))
    return n_bytes / n_tok if n_tok else 1.0


# ----------------------------------------------------------------------------- driver
def recipe_overrides(recipe: str, setting: str, steps: int | None, extra: dict, out: Path, name: str, seed: int) -> dict:
    from phase7fw.recipe.loader import read_toml

    raw = read_toml(recipe)
    overrides = {}
    if setting == "tiny":
        for key, value in TINY.items():
            table = raw
            for part in key.split(".")[:-1]:
                table = table.get(part) if isinstance(table, dict) else None
            if isinstance(table, dict):
                overrides[key] = value
    if steps:
        overrides["train.max_steps"] = steps
    overrides.update(extra)
    overrides.update({"run.seed": seed, "run.output_dir": str(out / "runs" / f"{name}_s{seed}")})
    return overrides


def run_all(specs: list[dict], jobs: int, out: Path) -> list[dict]:
    """Run the specs in worker processes, ``jobs`` at a time; returns their results in order."""
    pending = list(enumerate(specs))
    running: list = []
    results: dict[int, dict] = {}
    failed = []
    (out / "logs").mkdir(parents=True, exist_ok=True)
    while pending or running:
        while pending and len(running) < jobs:
            i, spec = pending.pop(0)
            result_path = out / "logs" / f"{spec['name']}_s{spec['seed']}.json"
            log = open(out / "logs" / f"{spec['name']}_s{spec['seed']}.log", "w")
            proc = subprocess.Popen([sys.executable, __file__, "--worker", json.dumps(spec), "--result", str(result_path)],
                                    stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
            running.append((i, spec, proc, log, result_path, time.perf_counter()))
            print(f"started  {spec['name']} seed {spec['seed']}", flush=True)
        time.sleep(1.0)
        for item in list(running):
            i, spec, proc, log, result_path, t0 = item
            if proc.poll() is None:
                continue
            running.remove(item)
            log.close()
            if proc.returncode == 0 and result_path.exists():
                results[i] = json.loads(result_path.read_text())
                print(f"finished {spec['name']} seed {spec['seed']}: val loss {results[i]['final_val_loss']:.4f}"
                      f" ({time.perf_counter() - t0:.0f} s)", flush=True)
            else:
                failed.append(spec)
                tail = (out / "logs" / f"{spec['name']}_s{spec['seed']}.log").read_text().splitlines()[-15:]
                print(f"FAILED   {spec['name']} seed {spec['seed']} (exit {proc.returncode}):\n  " + "\n  ".join(tail),
                      flush=True)
    if failed:
        print(f"{len(failed)} run(s) failed: {', '.join(s['name'] for s in failed)}", flush=True)
    return [results[i] for i in sorted(results)]


def measure_speeds(specs: list[dict], steps: int, out: Path) -> dict[str, float]:
    """{recipe name: tokens/s} of each recipe trained alone for ``steps`` steps (its first
    seed's settings, one evaluation of one batch at the end; the second half of the steps
    counts, so compilation does not)."""
    probes, seen = [], set()
    for spec in specs:
        if spec["name"] in seen:
            continue
        seen.add(spec["name"])
        over = dict(spec["overrides"], **{
            "train.max_steps": steps, "train.eval_every": steps, "train.eval_batches": 1,
            "train.log_every": max(1, steps // 10), "train.save_every": steps,
            "run.output_dir": str(Path(spec["overrides"]["run.output_dir"]).parent / f"{spec['name']}_speed")})
        over.pop("callbacks", None)  # diagnostics would be timed too
        probes.append(dict(spec, name=f"{spec['name']}_speed", overrides=over))
    print(f"timing each recipe alone for {steps} steps (equal wall clock at these speeds)", flush=True)
    return {r["name"].removesuffix("_speed"): r["tokens_per_s"] for r in run_all(probes, 1, out) if r.get("tokens_per_s")}


def prepare_data(spec: dict) -> None:
    """Tokenize the data of one run into the shared cache (every recipe here uses the same)."""
    from phase7fw.data.mixture import load_mix
    from phase7fw.core.build import build_tokenizer, cache_dir
    from phase7fw.plugins import load_plugins
    from phase7fw.recipe import load_recipe

    plugins = load_plugins()
    recipe = load_recipe(spec["recipe"], spec["overrides"], plugins=plugins)
    sources = load_mix(recipe, plugins.registry, build_tokenizer(recipe, plugins), cache_dir=cache_dir(recipe), log=print)
    # How often the schedule reads each source: text seen twice favours models that memorize
    # (the standard library alone was 2.35 epochs on the GPU machine; benchmarks/RESULTS.md).
    t = recipe.train
    tokens = t.max_steps * t.batch_size * t.grad_accum_steps * recipe.model.config.seq_len
    total = sum(s.weight for s in sources)
    for s in sources:
        epochs = tokens * s.weight / total / max(len(s.train), 1)
        print(f"data: {s.label}: {len(s.train):,} training tokens; {tokens:,} tokens read {epochs:.2f} epochs of it"
              + ("  WARNING: text repeats, the comparison favours models that memorize" if epochs > 1 else ""),
              flush=True)


# ----------------------------------------------------------------------------- report
def _interp(points: list[tuple[float, float]], x: float) -> float | None:
    """Linear interpolation of y at x over sorted (x, y) points; None outside their range."""
    if not points or x < points[0][0] or x > points[-1][0]:
        return None
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return points[-1][1]


def _mean_std(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    m = sum(values) / len(values)
    return m, (math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0)


def summarize(results: list[dict], jobs: int, speeds: dict | None = None) -> dict:
    """Per recipe (mean over seeds): params, losses at equal tokens and at equal wall clock.
    ``speeds`` ({name: tokens/s measured alone}, ``--speed-steps``): when it has every recipe,
    equal wall clock is reckoned at those speeds instead of the runs' own training times."""
    by_name: dict[str, list[dict]] = {}
    for r in results:
        by_name.setdefault(r["name"], []).append(r)
    solo = speeds if speeds and all(speeds.get(name) for name in by_name) else None

    def seconds(run, point):  # training time of an evaluation: measured, or at the solo speed
        return point["tokens"] / solo[run["name"]] if solo else point["train_seconds"]

    ends = [seconds(r, r["val"][-1]) for r in results if r["val"]]
    budget = min((t for t in ends if t), default=None)
    rows = []
    for name, runs in by_name.items():
        steps = sorted({v["step"] for r in runs for v in r["val"]})
        third = steps[max(0, math.ceil(len(steps) / 3) - 1)] if steps else None

        def loss_at(run, step):
            return next((v["loss"] for v in run["val"] if v["step"] == step), None)

        end, end_sd = _mean_std([loss_at(r, steps[-1]) for r in runs] if steps else [])
        early, _ = _mean_std([loss_at(r, third) for r in runs] if steps else [])
        at_budget, _ = _mean_std([_interp([(seconds(r, v), v["loss"]) for v in r["val"]], budget)
                                  for r in runs] if budget else [])
        bpt = runs[0]["bytes_per_token"] or 1.0
        # overfitting shows as a best validation loss before the end and a training loss far
        # below it: the training loss is the mean over the run's last tenth of steps
        best, _ = _mean_std([min(v["loss"] for v in r["val"]) for r in runs if r["val"]])
        best_tokens = min(runs[0]["val"], key=lambda v: v["loss"])["tokens"] if runs[0]["val"] else None
        train_end, _ = _mean_std([_late_mean(r.get("train") or [], r["val"][-1]["step"] if r["val"] else 0)
                                  for r in runs])
        rows.append({
            "name": name, "params": runs[0]["params"], "seeds": [r["seed"] for r in runs],
            "tokens_early": next((v["tokens"] for v in runs[0]["val"] if v["step"] == third), None),
            "tokens_end": runs[0]["tokens"], "val_loss_early": early, "val_loss_end": end, "val_loss_end_std": end_sd,
            "bpb_end": None if end is None else end / math.log(2) / bpt,
            "val_loss_equal_time": at_budget, "val_loss_best": best, "tokens_best": best_tokens,
            "train_loss_end": train_end,
            "tokens_per_s": _mean_std([r["tokens_per_s"] for r in runs])[0],
            "solo_tokens_per_s": solo[name] if solo else None,
            "train_seconds": _mean_std([r["train_seconds"] for r in runs])[0],
            "peak_memory_gib": runs[0]["peak_memory_gib"],
        })
    base = next((r for r in rows if BASELINE in r["name"]), rows[0] if rows else None)
    for r in rows:
        r["vs_baseline"] = (r["val_loss_end"] / base["val_loss_end"] - 1) if base and r["val_loss_end"] else None
    # "three seeds where it decides": each seed against the baseline's run of the same seed
    base_end = {run["seed"]: run.get("final_val_loss") for run in by_name.get(base["name"], [])} if base else {}
    for r in rows:
        pairs = {run["seed"]: run["final_val_loss"] / base_end[run["seed"]] - 1 for run in by_name[r["name"]]
                 if r is not base and run.get("final_val_loss") and base_end.get(run["seed"])}
        r["vs_baseline_per_seed"] = dict(sorted(pairs.items()))
    first = results[0] if results else {}
    return {"rows": rows, "baseline": base["name"] if base else None, "time_budget_s": budget, "jobs": jobs,
            "equal_time_from": "solo speeds" if solo else "training times", "solo_tokens_per_s": speeds or {},
            "device": first.get("device"), "torch": first.get("torch"), "date": time.strftime("%Y-%m-%d"),
            "gates": gate_means(by_name)}


def gate_means(by_name: dict[str, list[dict]]) -> dict:
    """The mixer gate's mean per layer (the attention path's share, ``L{i}.gate_mean`` of the
    diagnostics rows), mean over seeds, at the first and the last diagnostics step of each
    recipe that logged them: ``{name: {step: [layer 0, layer 1, ...] (None: no gate there)}}``."""
    gates = {}
    for name, runs in by_name.items():
        steps = sorted({d["step"] for r in runs for d in r.get("diag") or [] if any(k.endswith(".gate_mean") for k in d)})
        if not steps:
            continue
        layers = 1 + max(int(k[1:].split(".")[0]) for r in runs for d in r.get("diag") or []
                         for k in d if k.startswith("L") and k.endswith(".gate_mean"))
        gates[name] = {}
        for step in sorted({steps[0], steps[-1]}):
            rows = [d for r in runs for d in r.get("diag") or [] if d["step"] == step]
            gates[name][step] = [_mean_std([d.get(f"L{i}.gate_mean") for d in rows])[0] for i in range(layers)]
    return gates


def _late_mean(train: list[dict], last_step: int) -> float | None:
    """Mean training loss over the last tenth of the steps (None without training rows)."""
    late = [t["loss"] for t in train if t.get("loss") is not None and t["step"] > 0.9 * last_step]
    return sum(late) / len(late) if late else None


def markdown(summary: dict) -> str:
    def f(v, fmt="{:.4f}"):
        return "-" if v is None else fmt.format(v)

    rows = summary["rows"]
    early = rows[0]["tokens_early"] if rows else None
    end = rows[0]["tokens_end"] if rows else None
    shared = f"; runs shared the device ({summary['jobs']} at a time)" if summary["jobs"] > 1 else ""
    if summary.get("equal_time_from") == "solo speeds":
        when = (f"{f(summary['time_budget_s'], '{:.0f}')} s at each recipe's tokens/s measured alone"
                f" (the fastest recipe's run){shared}")
    else:
        when = (f"{f(summary['time_budget_s'], '{:.0f}')} s of training (the fastest recipe's)"
                + (f"{shared}: their times compare nothing unless the runs were alike (--speed-steps)" if shared else ""))
    lines = [
        f"Quality benchmark, {summary['date']}, {summary['device']}, torch {summary['torch']}; validation loss in"
        f" nats/token (mean over seeds, ± std where several); equal wall clock = {when}.",
        "",
        f"| recipe | params | seeds | val loss @ {_tokens(early)} tok | val loss @ {_tokens(end)} tok"
        f" | vs {summary['baseline']} | bits/byte | best val loss (@ tok) | train loss @ end"
        " | val loss @ equal time | tokens/s (alone) | train s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        sd = f" ± {r['val_loss_end_std']:.4f}" if r["val_loss_end_std"] else ""
        lines.append(
            f"| {r['name']} | {r['params'] / 1e6:.1f}M | {len(r['seeds'])} | {f(r['val_loss_early'])} | {f(r['val_loss_end'])}{sd}"
            f" | {f(r['vs_baseline'], '{:+.1%}')} | {f(r['bpb_end'])}"
            f" | {f(r.get('val_loss_best'))} (@ {_tokens(r.get('tokens_best'))}) | {f(r.get('train_loss_end'))}"
            f" | {f(r['val_loss_equal_time'])}"
            f" | {f(r['tokens_per_s'], '{:,.0f}')}"
            + (f" ({r['solo_tokens_per_s']:,.0f})" if r.get("solo_tokens_per_s") else "")
            + f" | {f(r['train_seconds'], '{:.0f}')} |")
    paired = [r for r in rows if r.get("vs_baseline_per_seed")]
    if paired:
        lines += ["", f"Per seed against {summary['baseline']} (the final validation loss of the same seed):", ""]
        lines += [f"- {r['name']}: " + ", ".join(f"seed {seed} {v:+.1%}" for seed, v in r["vs_baseline_per_seed"].items())
                  + (" (better in every seed)" if len(r["vs_baseline_per_seed"]) > 1
                     and all(v < 0 for v in r["vs_baseline_per_seed"].values()) else "")
                  for r in paired]
    for name, by_step in (summary.get("gates") or {}).items():
        width = max(len(v) for v in by_step.values())
        lines += ["", f"Mixer gate mean per layer, {name} (the attention path's share; diagnostics rows, mean over seeds):",
                  "", "| step | " + " | ".join(f"L{i}" for i in range(width)) + " |", "|---" * (width + 1) + "|"]
        lines += [f"| {step} | " + " | ".join(f(v, "{:.3f}") for v in values) + " |" for step, values in by_step.items()]
    return "\n".join(lines) + "\n"


def _tokens(n) -> str:
    if n is None:
        return "-"
    return f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n / 1e3:.1f}k"


def plot(results: list[dict], path: Path) -> str | None:
    """quality.png: validation loss vs tokens and vs training time. Returns why not, if not."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot (pip install matplotlib)"
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in results:
        label = f"{r['name']} s{r['seed']}"
        axes[0].plot([v["tokens"] / 1e6 for v in r["val"]], [v["loss"] for v in r["val"]], marker=".", label=label)
        axes[1].plot([v["train_seconds"] for v in r["val"]], [v["loss"] for v in r["val"]], marker=".", label=label)
    axes[0].set_xlabel("training tokens (M)")
    axes[1].set_xlabel("training time (s, evaluation excluded)")
    for ax in axes:
        ax.set_ylabel("validation loss (nats/token)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def report(results: list[dict], jobs: int, out: Path, speeds: dict | None = None) -> dict:
    summary = summarize(results, jobs, speeds)
    (out / "quality.json").write_text(json.dumps({"summary": summary, "runs": results}, indent=1))
    md = markdown(summary)
    (out / "quality.md").write_text(md)
    print(md)
    why = plot(results, out / "quality.png")
    print(why or f"wrote {out / 'quality.json'}, {out / 'quality.md'}, {out / 'quality.png'}")
    return summary


def merged_report(paths: list[str], out: Path) -> int:
    """Re-render the report from one or several quality.json files (runs of several device
    calls: each recipe x seed once) into ``out``. A worker's own result (``logs/NAME_sSEED.json``,
    kept when a call ran out of time before the report) counts as one run."""
    runs, jobs, seen, speeds = [], 1, {}, {}
    for path in paths:
        try:
            data = json.loads(Path(path).read_text())
            if "runs" in data:
                part, part_jobs = data["runs"], data["summary"]["jobs"]
                for name, tok_s in (data["summary"].get("solo_tokens_per_s") or {}).items():
                    speeds.setdefault(name, tok_s)  # the first file's measurement of a recipe
            else:  # one worker result
                part, part_jobs = [data], 1
                missing = [key for key in ("name", "seed", "val") if key not in data]
                if missing:
                    raise KeyError(missing[0])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            print(f"error: {path}: cannot read it as a quality.json or a run's result of this benchmark"
                  f" ({type(exc).__name__}: {exc})", file=sys.stderr)
            return 2
        for run in part:
            key = (run["name"], run["seed"])
            if key in seen:
                print(f"error: {run['name']} seed {run['seed']} is in both {seen[key]} and {path}: give each run once",
                      file=sys.stderr)
                return 2
            seen[key] = path
        runs += part
        jobs = max(jobs, part_jobs)
    out.mkdir(parents=True, exist_ok=True)
    report(runs, jobs, out, speeds)
    return 0


# ----------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipes", nargs="*", help="recipes to compare (default: recipes/quality/*_100m*.toml)")
    ap.add_argument("--setting", choices=["full", "tiny"], default="full",
                    help="full: the recipes as they are; tiny: shrunk to a CPU smoke test")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--steps", type=int, default=None, help="override train.max_steps of every recipe")
    ap.add_argument("--jobs", type=int, default=1, help="runs at a time on the device")
    ap.add_argument("--speed-steps", type=int, default=0, metavar="N",
                    help="after the runs, time each recipe alone for N steps: equal wall clock at those speeds")
    ap.add_argument("--out", default="runs/quality")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="recipe override for every run (VALUE parsed as TOML)")
    ap.add_argument("--report", metavar="QUALITY_JSON", nargs="+",
                    help="only re-render quality.md/png from quality.json files (several: merged into --out)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    sys.path.insert(0, str(ROOT))
    if args.worker:
        result = worker(json.loads(args.worker))
        Path(args.result).write_text(json.dumps(result))
        return 0
    if args.report:
        return merged_report(args.report, Path(args.out) if len(args.report) > 1 else Path(args.report[0]).parent)

    from phase7fw.recipe.loader import parse_set

    extra = dict(parse_set(item) for item in args.set)
    recipes = args.recipes or DEFAULT_RECIPES
    for r in recipes:
        if not Path(r).is_file():
            print(f"error: recipe {r} not found", file=sys.stderr)
            return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    specs = []
    for recipe in recipes:
        name = Path(recipe).stem
        for seed in args.seeds:
            specs.append({"recipe": str(Path(recipe).resolve()), "name": name, "seed": seed,
                          "overrides": recipe_overrides(recipe, args.setting, args.steps, extra, out.resolve(), name, seed)})
    prepare_data(specs[0])  # the shared token cache, before the workers start (they would race on it)
    results = run_all(specs, max(1, args.jobs), out)
    if not results:
        return 1
    speeds = measure_speeds(specs, args.speed_steps, out) if args.speed_steps > 0 else None
    report(results, args.jobs, out, speeds)
    return 0 if len(results) == len(specs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
