"""Where a cached decoding step's time goes (issue 16, P9): the GPU time of each kernel of the
one-token step that ``phase7fw generate --cuda-graph`` replays, per token, next to the wall
time per token. A replayed graph is bound either by its kernels' own time (then the table
names the slow ones) or by how many it launches back to back (then kernel time per token is
well below wall time per token and the kernel count is what to cut).

    python benchmarks/decode_profile.py [RECIPE ...] [--tokens 64] [--top 20] [--no-compile] [--json PATH]

Default recipes: phase7_1.5b_standard and llama_1.5b, at batch 1, 16-bit weights on a GPU (as
``bench --generate`` and benchmarks/p9_generate.py run them), the step compiled before the
capture (``--compile-step``; ``--no-compile``: eager step). The profile replays the captured
graph; where the profiler records no kernels inside graph replays, it profiles the same
compiled step launched without the graph, and says so. On a CPU (tiny recipes) it profiles
the eager static step's operators, which shows the harness works, not where a GPU's time goes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _device_time(evt) -> float:
    """Microseconds of device (else CPU) self time of a profiler key-average row."""
    for name in ("self_device_time_total", "self_cuda_time_total"):
        value = getattr(evt, name, None)
        if value:
            return float(value)
    return 0.0


def _kernel_rows(prof, on_gpu: bool) -> list[dict]:
    rows = []
    for evt in prof.key_averages():
        if on_gpu:
            if "CUDA" not in str(getattr(evt, "device_type", "")):
                continue
            us = _device_time(evt)
        else:
            us = float(evt.self_cpu_time_total)
        if us > 0:
            rows.append({"name": evt.key, "calls": int(evt.count), "us": us})
    return sorted(rows, key=lambda r: -r["us"])


def profile_recipe(recipe: str, device: torch.device, tokens: int, compile_step: bool) -> dict:
    from torch.profiler import ProfilerActivity, profile

    from phase7fw import Engine
    from phase7fw.inference.decoding import GraphedDecoder, prepare_for_inference

    on_gpu = device.type == "cuda"
    engine = Engine.from_recipe(recipe, {"train.compile": False, "train.batch_size": 1, "train.grad_accum_steps": 1},
                                dummy_data=True, resume="never", device=str(device), quiet=True)
    model = engine.model
    precision = engine.recipe.train.precision
    if on_gpu and precision in ("bf16", "fp16"):  # as bench --generate: weights stored in the training precision
        prepare_for_inference(model, torch.bfloat16 if precision == "bf16" else torch.float16)
    model.eval()
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, engine.tokenizer.vocab_size, (min(64, engine.seq_len // 4),), generator=g).tolist()
    tokens = min(tokens, engine.seq_len - len(prompt) - 16)

    def decode(decoder, n: int, around=contextlib.nullcontext) -> float:
        decoder.reset(prompt)
        decoder.logits()
        for _ in range(4):  # warm-up: compile, capture
            decoder.extend([int(decoder.logits().argmax(-1))])
        if on_gpu:
            torch.cuda.synchronize()
        with around():
            t0 = time.perf_counter()
            for _ in range(n):
                decoder.extend([int(decoder.logits().argmax(-1))])
            if on_gpu:
                torch.cuda.synchronize()
            return time.perf_counter() - t0

    def profiled(decoder) -> list[dict]:
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
        prof = profile(activities=activities)
        decode(decoder, tokens, around=lambda: prof)
        return _kernel_rows(prof, on_gpu)

    compile_step = compile_step and on_gpu
    graphed = GraphedDecoder(model, device=device, autocast=engine.autocast, capture=on_gpu, strict=True,
                             compile_step=compile_step)
    wall = decode(graphed, tokens)
    rows, what = profiled(graphed), graphed.path
    if on_gpu and not rows:
        launched = GraphedDecoder(model, device=device, autocast=engine.autocast, capture=False,
                                  compile_step=compile_step)
        rows, what = profiled(launched), launched.path + " (the profiler saw no kernels inside graph replays)"
    total_us = sum(r["us"] for r in rows)
    out = {"recipe": recipe, "model": engine.model_name, "path": graphed.path, "profiled": what,
           "tokens": tokens, "ms_per_token": 1e3 * wall / tokens,
           "kernel_ms_per_token": total_us / 1e3 / tokens,
           "kernels_per_token": sum(r["calls"] for r in rows) / tokens,
           "rows": [dict(r, us_per_token=r["us"] / tokens, calls_per_token=r["calls"] / tokens) for r in rows]}
    del engine, model, graphed
    if on_gpu:
        torch.cuda.empty_cache()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipes", nargs="*")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--no-compile", action="store_true", help="profile the eager static step")
    ap.add_argument("--device", default=None)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    recipes = args.recipes or ([str(ROOT / "recipes" / r) for r in ("phase7_1.5b_standard.toml", "llama_1.5b.toml")]
                               if device.type == "cuda" else
                               [str(ROOT / "recipes" / r) for r in ("phase7_tiny.toml", "llama_tiny.toml")])
    for recipe in recipes:
        if not Path(recipe).is_file():
            print(f"error: recipe {recipe} not found", file=sys.stderr)
            return 2
    if args.tokens < 2:
        ap.error("--tokens must be >= 2")
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (operators, not kernels)"
    print(f"{where}, torch {torch.__version__}")
    results = []
    for recipe in recipes:
        r = profile_recipe(recipe, device, args.tokens, compile_step=not args.no_compile)
        results.append(r)
        print(f"\n{Path(recipe).stem} ({r['model']}), {r['path']}: {r['ms_per_token']:.3f} ms/token wall, "
              f"{r['kernel_ms_per_token']:.3f} ms/token in {r['kernels_per_token']:.0f} kernels"
              f" (profiled: {r['profiled']})")
        print("| kernel | per token | us/token | share |\n|---|---|---|---|")
        for row in r["rows"][: args.top]:
            share = row["us_per_token"] / max(1e-9, 1e3 * r["kernel_ms_per_token"])
            print(f"| {row['name'][:90]} | {row['calls_per_token']:.1f} | {row['us_per_token']:.1f} | {share:.1%} |")
    if args.json:
        args.json.write_text(json.dumps({"device": where, "torch": torch.__version__, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
