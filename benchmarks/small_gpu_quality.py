"""Small-GPU mode vs standard mixed-precision AdamW: same model, data and seed (issue 7).

    python benchmarks/small_gpu_quality.py [--steps 300] [--out DIR] [--set key=value ...]

Trains a ~100M-parameter phase7 model (d_model 768, 10 layers, seq 512, byte tokenizer) on
the Python standard library's source twice from the same initial weights and data order:

  standard   fp32 weights, fp32 AdamW moments, bf16 autocast (recipes/phase7_1.5b_standard.toml's setup)
  small-gpu  bf16 weights with stochastic rounding, 8-bit AdamW moments offloaded to CPU memory,
             every block checkpointed, cross-entropy in 256-token chunks (recipes/phase7_1.5b.toml's setup)

and prints the final training loss (mean of the last 20 steps), the validation loss, their
relative gap (target: within 2%), tokens/s and peak memory of each. Writes quality.json to --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "phase7_small.toml"

MODEL_100M = {
    "model.d_model": 768, "model.n_layers": 10, "model.n_heads": 12, "model.seq_len": 512,
    "model.attention.window": 256, "model.ssm.n_heads": 12, "model.ssm.chunk_size": 64,
    "train.batch_size": 8, "train.grad_accum_steps": 1, "train.precision": "bf16", "train.grad_clip": 1.0,
    "optimizer.lr": 6e-4, "lr_scheduler.warmup_steps": 30, "lr_scheduler.min_lr": 6e-5,
    "curvature_scheduler.warmup_steps": 100, "train.log_every": 1,
    "kernels.hyperbolic_attention": "auto", "kernels.ar_ssm_scan": "auto", "train.eval_batches": 16,
}

MODES = {
    "standard": {"optimizer.name": "adamw", "train.param_dtype": "fp32", "train.activation_checkpointing": False},
    "small-gpu": {"optimizer.name": "adamw_lowmem", "optimizer.state_bits": 8, "optimizer.offload_states": True,
                  "train.param_dtype": "bf16", "train.activation_checkpointing": True, "train.ce_chunk_tokens": 256},
}


def train(mode: str, steps: int, extra: dict, out_dir: str) -> dict:
    from phase7fw import Engine

    overrides = {**MODEL_100M, **MODES[mode], **extra, "train.max_steps": steps, "train.eval_every": steps,
                 "train.save_every": 0, "run.output_dir": f"{out_dir}/{mode}", "run.seed": 0}
    engine = Engine.from_recipe(RECIPE, overrides, resume="never")
    n_params = sum(p.numel() for p in engine.model.parameters())
    if engine.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(engine.device)
    t0 = time.perf_counter()
    summary = engine.fit()
    wall = time.perf_counter() - t0
    log = [json.loads(line) for line in (Path(out_dir) / mode / "training_log.jsonl").read_text().splitlines()]
    train_rows = [r for r in log if r.get("split") == "train"]
    tail = train_rows[-20:] if len(train_rows) >= 20 else train_rows
    return {
        "mode": mode, "params": n_params, "steps": summary.get("steps"),
        "final_train_loss_mean20": sum(r["loss"] for r in tail) / len(tail),
        "final_val_loss": summary.get("final_val_loss"),
        "final_val_bpb": summary.get("final_val_bpb"),
        "first_loss": train_rows[0]["loss"] if train_rows else None,
        "tokens_per_s": summary.get("tokens", 0) / wall if wall > 0 else None,
        "peak_memory_gib": torch.cuda.max_memory_allocated(engine.device) / 2**30 if engine.device.type == "cuda" else None,
        "device": str(engine.device),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--out", default=".")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra recipe override for both runs (value parsed as JSON when it can be)")
    args = ap.parse_args(argv)
    extra = {}
    for item in args.set:
        key, _, value = item.partition("=")
        try:
            extra[key] = json.loads(value)
        except json.JSONDecodeError:
            extra[key] = value
    rows = []
    with tempfile.TemporaryDirectory(prefix="phase7fw-quality-") as tmp:
        for mode in MODES:
            rows.append(train(mode, args.steps, extra, tmp))
            print(json.dumps(rows[-1]), flush=True)
    std, small = rows
    gap_train = small["final_train_loss_mean20"] / std["final_train_loss_mean20"] - 1
    gap_val = (small["final_val_loss"] / std["final_val_loss"] - 1) if std["final_val_loss"] else None
    result = {"runs": rows, "gap_train": gap_train, "gap_val": gap_val,
              "torch": torch.__version__, "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
              "date": time.strftime("%Y-%m-%d")}
    print("| mode | params | first loss | final train loss (mean of last 20) | val loss | val bits/byte | tokens/s"
          " | peak GiB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        peak = f"{r['peak_memory_gib']:.2f}" if r["peak_memory_gib"] is not None else "-"
        val = f"{r['final_val_loss']:.4f}" if r["final_val_loss"] is not None else "-"
        bpb = f"{r['final_val_bpb']:.4f}" if r["final_val_bpb"] is not None else "-"
        print(f"| {r['mode']} | {r['params'] / 1e6:.1f}M | {r['first_loss']:.4f} | {r['final_train_loss_mean20']:.4f} "
              f"| {val} | {bpb} | {r['tokens_per_s']:,.0f} | {peak} |")
    print(f"gap small-gpu vs standard: train {gap_train:+.2%}" + (f", val {gap_val:+.2%}" if gap_val is not None else ""))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "quality.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
