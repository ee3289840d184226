"""Data pipeline benchmark: tokenization throughput and the loader's time per batch.

    python benchmarks/data.py [--vocab 8192] [--workers N] [--batch 8] [--seq 1024]

1. Trains a byte-level BPE tokenizer on a sample of the Python standard library (the default
   corpus) and tokenizes the whole corpus into a fresh cache with N worker processes: MB/s.
2. Draws training batches of B x T windows from the memory-mapped cache with the mixture
   sampler (what the trainer does every micro-batch): ms per batch, to compare with a GPU
   step (target P10: data time <= 2% of the step).
"""

import argparse
import os
import platform
import tempfile
import time

import numpy as np

from phase7fw.data.mixture import MixtureSampler, load_mix
from phase7fw.core.build import build_tokenizer
from phase7fw.plugins import load_plugins
from phase7fw.recipe import load_recipe


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--batches", type=int, default=200)
    args = ap.parse_args()

    plugins = load_plugins()
    with tempfile.TemporaryDirectory() as cache:
        recipe = load_recipe({
            "model": {"name": "llama", "d_model": 64, "n_layers": 1, "n_heads": 1, "seq_len": args.seq},
            "data": {"tokenizer": {"name": "bpe", "vocab_size": args.vocab}, "cache_dir": cache,
                     "sources": [{"name": "python_stdlib"}], "val_fraction": 0.01},
        }, plugins=plugins)
        tokenizer = build_tokenizer(recipe, plugins)
        t0 = time.perf_counter()
        sources = load_mix(recipe, plugins.registry, tokenizer, cache_dir=cache, workers=args.workers)
        total = time.perf_counter() - t0
        src = sources[0]
        mb = sum(p.stat().st_size for p in _stdlib_files()) / 1e6
        tok_s = src.info["seconds"]
        print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, workers {args.workers}")
        print(f"corpus: {mb:.1f} MB of .py, {src.info['n_tokens']:,} tokens ({src.info['dtype']}), "
              f"{src.info['n_docs']:,} documents")
        print(f"bpe training + tokenization: {total:.1f} s in all; tokenization {tok_s:.1f} s = {mb / tok_s:.2f} MB/s")

        sampler = MixtureSampler(sources, seq_len=args.seq, batch_size=args.batch, seed=0)
        for i in range(5):
            sampler.batch(i)  # warm the page cache
        times = []
        for i in range(args.batches):
            t = time.perf_counter()
            x, y = sampler.batch(1000 + i)
            times.append(time.perf_counter() - t)
        ms = np.median(times) * 1e3
        print(f"loader: B={args.batch} x T={args.seq}: median {ms:.3f} ms per batch, p99 {np.percentile(times, 99) * 1e3:.3f} ms")
        for name, step_ms in (("llama 1.44B, H200, B=8 (~60k tok/s in PERFORMANCE.md)", 8 * 1024 / 60e3 * 1e3),):
            print(f"vs {name}: step ~{step_ms:.0f} ms -> data {100 * ms / step_ms:.2f}% of the step")


def _stdlib_files():
    import sysconfig
    from pathlib import Path

    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "__pycache__"}
    return [p for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts)]


if __name__ == "__main__":
    main()
