"""Cached decoding on the current device: exactness and speed against full recomputation.

For each model kind (llama, phase7 hybrid / attention-only / SSM-only / SDPA), greedy decoding
with the cache must give the tokens of recomputing the visible context per token (fp32, so the
comparison is about the algorithm, not bf16 rounding), also past seq_len. Then the tokens/s of
both modes at a growing context show that a phase7 token costs O(1) in the context length.

    python benchmarks/bench_decoding.py [--device cuda] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from phase7fw import build_model, load_recipe  # noqa: E402
from phase7fw.decoding import Decoder  # noqa: E402

SMALL = {"model.seq_len": 128, "model.d_model": 256, "model.n_heads": 4, "model.n_layers": 4}
P7 = {**SMALL, "model.attention.window": 32, "model.ssm.n_heads": 4, "model.ssm.chunk_size": 16}
KINDS = {
    "llama": ("llama_tiny", {**SMALL, "model.ffn_hidden": 512}),
    "phase7_hybrid": ("phase7_tiny", P7),
    "phase7_attention_only": ("phase7_tiny", {**P7, "model.mixer": "attention"}),
    "phase7_ssm_only": ("phase7_tiny", {**P7, "model.mixer": "ssm"}),
    "phase7_sdpa_window": ("phase7_tiny", {**P7, "model.attention": {"name": "sdpa", "window": 32}}),
}


def greedy(model, prompt, n, use_cache, device):
    dec = Decoder(model, use_cache=use_cache, device=device)
    dec.reset(prompt)
    out = []
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        out.append(int(dec.logits().argmax()))
        dec.extend(out[-1:])
    return out, time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tokens", type=int, default=300)
    ap.add_argument("--json")
    args = ap.parse_args()
    device = torch.device(args.device)
    rows = []
    for name, (recipe, over) in KINDS.items():
        torch.manual_seed(0)
        model = build_model(load_recipe(ROOT / "recipes" / f"{recipe}.toml", over), device).eval()
        prompt = torch.randint(0, 257, (40,), generator=torch.Generator().manual_seed(1)).tolist()
        ref, t_ref = greedy(model, prompt, args.tokens, False, device)
        got, t_got = greedy(model, prompt, args.tokens, True, device)
        first_diff = next((i for i, (a, b) in enumerate(zip(ref, got)) if a != b), None)
        rows.append({"model": name, "tokens": args.tokens, "equal": ref == got, "first_difference": first_diff,
                     "uncached_tokens_per_s": args.tokens / t_ref, "cached_tokens_per_s": args.tokens / t_got})
        r = rows[-1]
        print(f"{name:24s} cached == uncached: {r['equal']} (first diff {first_diff}) | tokens/s uncached"
              f" {r['uncached_tokens_per_s']:8.1f}  cached {r['cached_tokens_per_s']:8.1f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"device": str(device), "rows": rows}, indent=2))
    return 0 if all(r["equal"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
