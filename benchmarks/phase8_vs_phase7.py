"""Phase 8 (O(T) hyperbolic linear attention) vs Phase 7 (windowed hyperbolic attention) vs the
llama baseline, as the sequence grows (``make bench-phase8-vs-phase7``).

    python benchmarks/phase8_vs_phase7.py [--lengths 1024,2048,...] [--tokens-per-step N]
        [--steps N] [--warmup N] [--quality-tokens N] [--set KEY=VALUE ...]
        [--out runs/bench_phase8_vs_phase7]

For every sequence length T it trains each model for a few steps on random tokens (the real
training step, :func:`phase7fw.cli.benchmark.bench_recipe`) at equal tokens per step (batch =
tokens_per_step / T) and reports training tokens/s and peak memory; a length that does not
fit says "out of memory". The three small models have equal parameter counts: phase7_small
and phase8_small as shipped, and a llama whose FFN width is chosen to match them. Then each
model trains on the same data (the quality benchmark's corpus, :func:`quality_sources`, byte
tokens, same seed and schedule) for the same number of tokens and its validation loss is reported. Prints the
tables and writes ``OUT.json`` and ``OUT.md``.

``--set`` adds a recipe override to every model (after the script's own), e.g. the AR-SSM scan's
chunk-parallel schedule, which Phase 7 and Phase 8 both use:
``--set 'kernels.ar_ssm_scan={impl="triton", schedule="chunks"}'`` (docs/kernels.md).

On a CPU it runs tiny sizes (shorter lengths, fewer tokens) and says so: those numbers only
show that everything runs, not how fast a GPU is.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RECIPES = {
    "phase7 (window)": ROOT / "recipes" / "phase7_small.toml",
    "phase8 (linear)": ROOT / "recipes" / "phase8_small.toml",
    "llama (sdpa)": ROOT / "recipes" / "llama_tiny.toml",
}
GPU_LENGTHS = (1024, 2048, 4096, 8192, 16384, 32768)
CPU_LENGTHS = (128, 256, 512, 1024)
#: the CPU's "tiny sizes": small enough to finish in a minute or two on two cores
CPU_MODEL = {"model.d_model": 64, "model.n_layers": 2, "model.n_heads": 2}


def _gpu() -> bool:
    return torch.cuda.is_available()


def model_overrides(name: str, *, d_model: int, n_layers: int, n_heads: int, gpu: bool) -> dict:
    """Size, precision and kernels of one model (the same for every model)."""
    over = {"model.d_model": d_model, "model.n_layers": n_layers, "model.n_heads": n_heads,
            "train.grad_accum_steps": 1, "train.precision": "bf16" if gpu else "fp32", "train.compile": False,
            "train.activation_checkpointing": False, "train.eval_every": 0, "train.save_every": 0}
    if gpu and not name.startswith("llama"):
        kernels = ("ar_ssm_scan", "rmsnorm", "swiglu", "htt_embedding")
        kernels += ("hyperbolic_linear_attention",) if name.startswith("phase8") else ("hyperbolic_attention",)
        over.update({f"kernels.{op}": "auto" for op in kernels})
    return over


def apply_sets(models: dict, sets: list[str], seq_len: int) -> None:
    """Add the ``--set KEY=VALUE`` overrides to every model's, each model's recipe validated
    with them (a :class:`~phase7fw.errors.RecipeError` names the model and the key)."""
    from phase7fw import load_recipe
    from phase7fw.errors import RecipeError
    from phase7fw.recipe import parse_set

    extra = dict(parse_set(item) for item in sets)
    for name, (recipe, over) in models.items():
        over.update(extra)
        try:
            load_recipe(recipe, {**over, "model.seq_len": seq_len})
        except RecipeError as exc:
            where = f"{Path(recipe).name} (model {name!r}, with the --set overrides)"
            raise RecipeError(exc.errors, source=where) from None


def match_llama_ffn(overrides: dict, target_params: int, seq_len: int) -> int:
    """The llama FFN width (a multiple of 16) whose parameter count is closest to ``target``."""
    from phase7fw import build_model, load_recipe

    def count(width: int) -> int:
        rec = load_recipe(RECIPES["llama (sdpa)"], {**overrides, "model.seq_len": seq_len, "model.ffn_hidden": width})
        return sum(p.numel() for p in build_model(rec, "meta", vocab_size=257).parameters())

    d = overrides["model.d_model"]
    base, per16 = count(16), count(32) - count(16)
    width = max(16, 16 * round((target_params - base) / per16) + 16) if per16 > 0 else 4 * d
    return width


def count_params(recipe, overrides: dict) -> int:
    from phase7fw import build_model, load_recipe

    return sum(p.numel() for p in build_model(load_recipe(recipe, overrides), "meta", vocab_size=257).parameters())


def speed_rows(models: dict, lengths, tokens_per_step: int, steps: int, warmup: int, device, say) -> list[dict]:
    from phase7fw.cli.benchmark import bench_recipe

    rows = []
    for T in lengths:
        batch = max(1, tokens_per_step // T)
        for name, (recipe, over) in models.items():
            run = {**over, "model.seq_len": T, "train.batch_size": batch, "train.max_steps": warmup + steps + 1}
            if name.startswith("phase7"):
                run["model.attention.window"] = min(T, over.get("model.attention.window", 256))
            try:
                r = bench_recipe(recipe, run, steps=steps, warmup=warmup, device=device)
            except Exception as exc:  # noqa: BLE001 - one failed cell never hides the others
                r = {"oom": False, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
            row = {"model": name, "seq_len": T, "batch_size": batch, "tokens_per_step": batch * T,
                   "params": r.get("params"), "oom": bool(r.get("oom")), "error": r.get("error"),
                   "tokens_per_s": r.get("tokens_per_s"), "peak_memory_gib": r.get("peak_memory_gib")}
            rows.append(row)
            say(f"T={T:>6} {name:<16} {_speed_cell(row)}")
    return rows


def quality_sources(max_files: int) -> list[dict]:
    """The quality runs' corpus: the first ``max_files`` files of the standard library (the
    CPU's quick setting), or (0) the quality benchmark's corpus, recipes/quality/common.toml:
    35% standard library + 65% torch's sources, large enough that 20M tokens repeat no text
    (repeated text favours the models that memorize; benchmarks/RESULTS.md, "Model quality")."""
    if max_files:
        return [{"name": "python_stdlib", "max_files": max_files}]
    return [{"name": "python_stdlib", "weight": 0.35}, {"name": "python_packages", "packages": ["torch"], "weight": 0.65}]


def quality_rows(models: dict, tokens: int, seq_len: int, batch: int, device, say, *, lr: float = 1e-3,
                 max_files: int = 0) -> list[dict]:
    """Each model trained for ``tokens`` tokens on the same data, seed and schedule (AdamW at
    ``lr``, warm-up then cosine to lr/10); its validation loss."""
    from phase7fw import Engine

    steps = max(1, tokens // (batch * seq_len))
    rows = []
    with tempfile.TemporaryDirectory(prefix="phase8-vs-phase7-") as tmp:
        for i, (name, (recipe, over)) in enumerate(models.items()):
            run = {**over, "model.seq_len": seq_len, "train.batch_size": batch, "train.max_steps": steps,
                   "train.eval_batches": 16, "lr_scheduler.warmup_steps": max(1, steps // 20), "run.seed": 0,
                   "run.output_dir": f"{tmp}/{i}", "train.log_every": max(1, steps // 10),
                   "data.sources": quality_sources(max_files), "data.sampling": "epochs", "data.val_fraction": 0.02,
                   "optimizer.name": "adamw", "optimizer.lr": lr, "optimizer.weight_decay": 0.1,
                   "lr_scheduler.name": "warmup_cosine", "lr_scheduler.min_lr": lr / 10}
            if name.startswith("phase7"):
                run["model.attention.window"] = min(seq_len, over.get("model.attention.window", 256))
            if not name.startswith("llama"):
                run["curvature_scheduler.warmup_steps"] = max(1, steps // 5)
            t0 = time.perf_counter()
            engine = Engine.from_recipe(recipe, run, resume="never", device=device, quiet=True)
            engine.fit()
            val = engine.evaluate()
            rows.append({"model": name, "params": sum(p.numel() for p in engine.model.parameters()),
                         "tokens": steps * batch * seq_len, "steps": steps, "seq_len": seq_len,
                         "val_loss": val["loss"], "seconds": time.perf_counter() - t0})
            say(f"quality {name:<16} val loss {val['loss']:.4f} after {rows[-1]['tokens']:,} tokens")
            del engine
    return rows


def _speed_cell(row: dict) -> str:
    if row["oom"]:
        return "out of memory"
    if row.get("error"):
        return f"failed: {row['error']}"
    peak = "n/a (CPU)" if row["peak_memory_gib"] is None else f"{row['peak_memory_gib']:.2f} GiB"
    return f"{row['tokens_per_s']:,.0f} tokens/s, peak {peak}"


def flatness(rows: list[dict], model: str) -> dict | None:
    """tokens/s at the longest length that ran / at the shortest (the P11 ratio) and the peak
    memory growth per doubling of T."""
    ok = [r for r in rows if r["model"] == model and r.get("tokens_per_s")]
    if len(ok) < 2:
        return None
    first, last = ok[0], ok[-1]
    out = {"from": first["seq_len"], "to": last["seq_len"], "tokens_per_s_ratio": last["tokens_per_s"] / first["tokens_per_s"]}
    if first["peak_memory_gib"] and last["peak_memory_gib"]:
        out["peak_memory_ratio"] = last["peak_memory_gib"] / first["peak_memory_gib"]
    return out


def markdown(result: dict) -> str:
    env = result["environment"]
    lines = [f"# Phase 8 vs Phase 7 vs llama ({env['device']}, torch {env['torch']}, triton {env['triton']},"
             f" {env['date']})", ""]
    if env["cpu"]:
        lines += ["**CPU run: tiny sizes** (d_model {d}, {L} layers, short sequences): these numbers show that"
                  " everything runs; they say nothing about GPU speed.".format(d=result["d_model"], L=result["n_layers"]),
                  ""]
    models = list(dict.fromkeys(r["model"] for r in result["speed"]))
    params = {r["model"]: r["params"] for r in result["speed"] if r.get("params")}
    lines += [f"Training speed at {result['tokens_per_step']:,} tokens per step (batch = tokens / T);"
              " params: " + ", ".join(f"{m} {params.get(m, 0) / 1e6:.2f}M" for m in models), ""]
    lines += ["| T | " + " | ".join(models) + " |", "|---|" + "---|" * len(models)]
    for T in dict.fromkeys(r["seq_len"] for r in result["speed"]):
        cells = [_speed_cell(r) for m in models for r in result["speed"] if r["seq_len"] == T and r["model"] == m]
        lines.append(f"| {T} | " + " | ".join(cells) + " |")
    for m in models:
        f = flatness(result["speed"], m)
        if f:
            mem = f", peak memory x{f['peak_memory_ratio']:.2f}" if "peak_memory_ratio" in f else ""
            lines.append(f"\n{m}: tokens/s at T={f['to']} / at T={f['from']} = {f['tokens_per_s_ratio']:.2f}{mem}")
    if result.get("quality"):
        q0 = result["quality"][0]
        lines += ["", f"Validation loss (nats/byte) after {q0['tokens']:,} training tokens, seq {q0['seq_len']},"
                      " same data, seed and schedule:", "", "| model | params | val loss |", "|---|---|---|"]
        lines += [f"| {q['model']} | {q['params'] / 1e6:.2f}M | {q['val_loss']:.4f} |" for q in result["quality"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    gpu = _gpu()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default=",".join(map(str, GPU_LENGTHS if gpu else CPU_LENGTHS)),
                    help="comma-separated sequence lengths")
    ap.add_argument("--tokens-per-step", type=int, default=32768 if gpu else 1024)
    ap.add_argument("--steps", type=int, default=10 if gpu else 2)
    ap.add_argument("--warmup", type=int, default=3 if gpu else 1)
    ap.add_argument("--quality-tokens", type=int, default=20_000_000 if gpu else 16_384,
                    help="training tokens of each model for the validation-loss comparison (0: skip)")
    ap.add_argument("--quality-seq-len", type=int, default=1024 if gpu else 128)
    ap.add_argument("--quality-lr", type=float, default=1e-3, help="learning rate of the quality runs (all models)")
    ap.add_argument("--quality-files", type=int, default=0 if gpu else 400,
                    help="train on the first N files of the standard library (0: the quality benchmark's corpus,"
                    " standard library + torch's sources)")
    ap.add_argument("--d-model", type=int, default=256 if gpu else CPU_MODEL["model.d_model"])
    ap.add_argument("--n-layers", type=int, default=4 if gpu else CPU_MODEL["model.n_layers"])
    ap.add_argument("--n-heads", type=int, default=4 if gpu else CPU_MODEL["model.n_heads"])
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                    help="a recipe override (TOML value) for every model, after the script's own, e.g."
                    " --set 'kernels.ar_ssm_scan={impl=\"triton\", schedule=\"chunks\"}' (repeatable)")
    ap.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda if available)")
    ap.add_argument("--out", default="runs/bench_phase8_vs_phase7", help="writes OUT.json and OUT.md")
    args = ap.parse_args(argv)
    try:
        lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
    except ValueError:
        print(f"error: --lengths must be comma-separated integers, got {args.lengths!r}", file=sys.stderr)
        return 2
    if not lengths or min(lengths) < 16 or args.tokens_per_step < 1 or args.steps < 1:
        print("error: lengths must be >= 16, --tokens-per-step and --steps >= 1", file=sys.stderr)
        return 2

    from phase7fw.cli.benchmark import environment
    from phase7fw.core.build import resolve_device
    from phase7fw.errors import Phase7Error

    device = resolve_device(args.device or "auto")
    env = environment(device)
    say = lambda text: print(text, flush=True)  # noqa: E731
    if env["cpu"]:
        say(f"CPU run: tiny sizes (d_model {args.d_model}, {args.n_layers} layers, lengths {lengths});"
            " the numbers only show that everything runs")
    size = dict(d_model=args.d_model, n_layers=args.n_layers, n_heads=args.n_heads, gpu=device.type == "cuda")
    models = {name: (recipe, model_overrides(name, **size)) for name, recipe in RECIPES.items()}
    try:
        apply_sets(models, args.overrides, lengths[0])
    except Phase7Error as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    target = count_params(RECIPES["phase7 (window)"], {**models["phase7 (window)"][1], "model.seq_len": lengths[0]})
    width = match_llama_ffn(models["llama (sdpa)"][1], target, lengths[0])
    models["llama (sdpa)"][1]["model.ffn_hidden"] = width
    result = {"environment": env, "lengths": lengths, "tokens_per_step": args.tokens_per_step, "steps": args.steps,
              "d_model": args.d_model, "n_layers": args.n_layers, "llama_ffn_hidden": width}
    result["speed"] = speed_rows(models, lengths, args.tokens_per_step, args.steps, args.warmup, str(device), say)
    if args.quality_tokens > 0:
        batch = max(1, args.tokens_per_step // args.quality_seq_len)
        result["quality"] = quality_rows(models, args.quality_tokens, args.quality_seq_len, batch, str(device), say,
                                         lr=args.quality_lr, max_files=args.quality_files)
    from benchmarks._report import write_report

    write_report(args.out, result, markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
