"""Kernels per layer of the compiled static decode step (what ``--compile-step`` captures in a
CUDA graph): a replayed graph at batch 1 is bound by its number of kernel launches, so this
counts them where a GPU is not needed. It compiles each recipe's one-token step with inductor,
reads the generated code (``torch._inductor.utils.run_and_get_code``) and counts the fused
kernels inductor wrote and the calls it leaves to library kernels (matmuls, SDPA, custom ops),
per layer. On a CPU the fused kernels are C++ loops, which fuse more freely than the Triton
kernels inductor writes for a GPU (a reduction there often starts a kernel of its own), so
the fused-kernel counts are a lower bound for the GPU; the library calls are the same, and
the counts compare models and changes (issue 16, P9; benchmarks/RESULTS.md).

    python benchmarks/decode_kernel_count.py [RECIPE ...] [--no-fuse] [--json PATH]

Default recipes: llama_tiny and phase7_tiny. Phase 7 blocks fuse their input projections
first, as ``prepare_for_inference`` does before decoding (``--no-fuse``: as they were before).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# what inductor's generated ``call()`` launches: its own fused kernels (C++ on a CPU, Triton on
# a GPU) and the calls it leaves to library kernels
FUSED = re.compile(r"\n\s+(?:cpp_fused_\w+|triton_\w+\.run)\(")
EXTERN = re.compile(r"(extern_kernels\.\w+|torch\.ops\.[\w.]+)\(")


def count(recipe: str, fuse: bool) -> dict:
    from torch._inductor.utils import run_and_get_code

    from phase7fw.core.build import build_model
    from phase7fw.inference.decoding import GraphedDecoder

    torch.manual_seed(0)
    model = build_model(recipe, "cpu", vocab_size=300).eval()
    fused = [block.fuse_input_projections() for block in model.blocks
             if fuse and callable(getattr(block, "fuse_input_projections", None))]
    decoder = GraphedDecoder(model, capture=False)  # the static buffers after a short prompt
    decoder.reset([5, 17, 2, 250, 9])
    decoder.logits()
    step = torch.compile(model.forward_static, fullgraph=True, dynamic=False)
    torch._dynamo.reset()
    with torch.no_grad():
        _, codes = run_and_get_code(step, decoder.static)
    call = "\n".join(code[code.find("def call("):] for code in codes)
    n_layers = len(model.blocks)
    kernels, externs = FUSED.findall(call), EXTERN.findall(call)
    return {"recipe": recipe, "layers": n_layers, "fused_blocks": sum(fused),
            "fused_kernels": len(kernels), "library_calls": len(externs),
            "per_layer": (len(kernels) + len(externs)) / n_layers,
            "library_calls_by_name": dict(Counter(externs).most_common())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipes", nargs="*", default=["recipes/llama_tiny.toml", "recipes/phase7_tiny.toml"])
    ap.add_argument("--no-fuse", action="store_true", help="leave phase7's input projections unfused")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    for recipe in args.recipes:
        if not Path(recipe).is_file():
            print(f"error: recipe {recipe} not found", file=sys.stderr)
            return 2
    rows = [count(r, fuse=not args.no_fuse) for r in args.recipes]
    print(f"compiled static decode step, torch {torch.__version__}, inductor on the CPU")
    print("| recipe | layers | fused kernels | library calls | per layer | library calls |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        calls = ", ".join(f"{name.removesuffix('.default').split('.')[-1]} {n}"
                          for name, n in r["library_calls_by_name"].items())
        print(f"| {Path(r['recipe']).stem}{' (fused)' if r['fused_blocks'] else ''} | {r['layers']}"
              f" | {r['fused_kernels']} | {r['library_calls']} | {r['per_layer']:.1f} | {calls} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
