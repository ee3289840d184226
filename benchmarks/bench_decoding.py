"""Cached decoding on the current device: exactness and speed against full recomputation.

For each model kind (llama, phase7 hybrid / attention-only / SSM-only / SDPA), greedy decoding
with the cache must give the tokens of recomputing the visible context per token (fp32, so the
comparison is about the algorithm, not bf16 rounding), also past seq_len. Then the tokens/s of
both modes at a growing context show that a phase7 token costs O(1) in the context length.

    python benchmarks/bench_decoding.py [--device cuda] [--json out.json]

``--graphs`` adds the static decode step (phase7fw.inference.decoding) run eagerly and, on CUDA,
captured in a CUDA graph (GraphedDecoder): its greedy tokens must equal the dynamic cached
path's, and its tokens/s are reported next to it. ``--precision bf16`` stores the linear
weights in bf16 and decodes under autocast (as ``phase7fw generate``); token equality is then
reported, not required (bf16 rounding may flip a near tie).

    python benchmarks/bench_decoding.py --graphs --tokens 300 [--precision bf16] [--compile-step]
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
from phase7fw.inference.decoding import Decoder, GraphedDecoder, prepare_for_inference  # noqa: E402

SMALL = {"model.seq_len": 128, "model.d_model": 256, "model.n_heads": 4, "model.n_layers": 4}
P7 = {**SMALL, "model.attention.window": 32, "model.ssm.n_heads": 4, "model.ssm.chunk_size": 16}
KINDS = {
    "llama": ("llama_tiny", {**SMALL, "model.ffn_hidden": 512}),
    "phase7_hybrid": ("phase7_tiny", P7),
    "phase7_attention_only": ("phase7_tiny", {**P7, "model.mixer": "attention"}),
    "phase7_ssm_only": ("phase7_tiny", {**P7, "model.mixer": "ssm"}),
    "phase7_sdpa_window": ("phase7_tiny", {**P7, "model.attention": {"name": "sdpa", "window": 32}}),
}


def greedy(model, prompt, n, use_cache, device, decoder=None, autocast=None):
    dec = decoder or Decoder(model, use_cache=use_cache, device=device, autocast=autocast)
    if decoder is not None:  # capture / warm up outside the timed part (first prefill)
        dec.reset(prompt)
        for _ in range(4):
            dec.extend([int(dec.logits().argmax())])
    dec.reset(prompt)
    out = []
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        out.append(int(dec.logits().argmax()))
        dec.extend(out[-1:])
    return out, time.perf_counter() - t0


def first_difference(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tokens", type=int, default=300)
    ap.add_argument("--json")
    ap.add_argument("--graphs", action="store_true", help="also the static step: eager, and a CUDA graph on CUDA")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--compile-step", action="store_true",
                    help="with --graphs: also the step compiled by torch.compile before the capture (experimental)")
    args = ap.parse_args()
    device = torch.device(args.device)
    bf16 = args.precision == "bf16"
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else None
    rows = []
    for name, (recipe, over) in KINDS.items():
        torch.manual_seed(0)
        model = build_model(load_recipe(ROOT / "recipes" / f"{recipe}.toml", over), device).eval()
        if bf16:
            prepare_for_inference(model, torch.bfloat16)
        prompt = torch.randint(0, 257, (40,), generator=torch.Generator().manual_seed(1)).tolist()
        ref, t_ref = greedy(model, prompt, args.tokens, False, device, autocast=autocast)
        got, t_got = greedy(model, prompt, args.tokens, True, device, autocast=autocast)
        first_diff = first_difference(ref, got)
        row = {"model": name, "tokens": args.tokens, "precision": args.precision, "equal": ref == got,
               "first_difference": first_diff, "uncached_tokens_per_s": args.tokens / t_ref,
               "cached_tokens_per_s": args.tokens / t_got}
        line = (f"{name:24s} cached == uncached: {row['equal']} (first diff {first_diff}) | tokens/s uncached"
                f" {row['uncached_tokens_per_s']:8.1f}  cached {row['cached_tokens_per_s']:8.1f}")
        if args.graphs:
            modes = [("static_eager", False, False)] + ([("cuda_graph", True, False)] if device.type == "cuda" else [])
            if args.compile_step:
                modes.append(("cuda_graph_compiled" if device.type == "cuda" else "static_compiled",
                              device.type == "cuda", True))
            for label, capture, compile_step in modes:
                dec = GraphedDecoder(model, device=device, autocast=autocast, capture=capture, strict=True,
                                     compile_step=compile_step)
                toks, t = greedy(model, prompt, args.tokens, True, device, decoder=dec)
                row[f"{label}_equal"] = toks == got
                row[f"{label}_first_difference"] = first_difference(got, toks)
                row[f"{label}_tokens_per_s"] = args.tokens / t
                row[f"{label}_path"] = dec.path
                line += f"  {label} {row[label + '_tokens_per_s']:8.1f} (== cached: {toks == got})"
        rows.append(row)
        print(line, flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"device": str(device), "rows": rows}, indent=2))
    if bf16:
        return 0
    return 0 if all(v for r in rows for k, v in r.items() if k.endswith("equal")) else 1


if __name__ == "__main__":
    sys.exit(main())
