"""The AR-SSM's causal depthwise convolution, forward + backward: ``F.conv1d(groups=d)`` (cuDNN on
a GPU, what the model runs) against the same convolution as K shifted multiply-adds in fp32,
eager and under torch.compile, at the 1.5B model's shape (issue 16: could a form that
torch.compile fuses replace cuDNN's depthwise path? benchmarks/RESULTS.md has the answer).

    python benchmarks/ssm_conv.py [--batch 8] [--seq 1024] [--d-model 2048] [--kernel 4] [--json PATH]

bf16 autocast on a GPU (what training runs), fp32 on a CPU (tiny default shape; says so).
Prints the median milliseconds of forward + backward per call (one layer) and the largest
difference of each output and gradient from conv1d's.
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

def depthwise_conv(seq, weight, bias):
    """conv1d(seq (b, d, L), weight (d, 1, K), bias, groups=d) as K shifted multiply-adds,
    accumulated in fp32 and rounded once (under autocast: inputs and result in its dtype)."""
    out_dtype = torch.promote_types(seq.dtype, weight.dtype)
    if torch.is_autocast_enabled(seq.device.type):
        out_dtype = torch.get_autocast_dtype(seq.device.type)
        seq, weight, bias = seq.to(out_dtype), weight.to(out_dtype), bias.to(out_dtype)
    K, n = weight.shape[-1], seq.shape[-1] - weight.shape[-1] + 1
    w = weight.reshape(-1, K).float()
    out = bias.float().unsqueeze(-1) + w[:, :1] * seq[..., :n].float()
    for k in range(1, K):
        out = out + w[:, k : k + 1] * seq[..., k : k + n].float()
    return out.to(out_dtype)


def conv1d(seq, w, b):
    return F.conv1d(seq, w, b, groups=w.shape[0])


def median_ms(fn, device, reps: int) -> float:
    if device.type == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=reps * 4, return_mode="median")
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return sorted(times)[len(times) // 2]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--d-model", type=int, default=2048)
    ap.add_argument("--kernel", type=int, default=4)
    ap.add_argument("--reps", type=int, default=25)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if not cuda:  # a CPU cannot say anything about the GPU question: tiny shape, says so
        args.batch, args.seq, args.d_model = 2, 128, 64
        print("no CUDA device: tiny CPU shape, fp32 (the numbers say nothing about a GPU)")
    dtype = torch.bfloat16 if cuda else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    K, d = args.kernel, args.d_model
    seq = torch.randn(args.batch, d, args.seq + K - 1, device=device, dtype=dtype, generator=g)
    w = torch.randn(d, 1, K, device=device, generator=g) / K**0.5
    b = torch.randn(d, device=device, generator=g)
    up = torch.randn(args.batch, d, args.seq, device=device, dtype=dtype, generator=g)

    def step(fn):
        s, wi, bi = (t.detach().requires_grad_() for t in (seq, w, b))
        with torch.autocast(device.type, dtype=dtype, enabled=cuda):
            out = fn(s, wi, bi)
        out.backward(up)
        return out.detach().float(), s.grad.float(), wi.grad, bi.grad

    ref = step(conv1d)
    rows = []
    impls = [("F.conv1d (cuDNN on CUDA)", conv1d), ("depthwise_conv, eager", depthwise_conv),
             ("depthwise_conv, torch.compile", torch.compile(depthwise_conv))]
    for name, fn in impls:
        got = step(fn)
        diffs = [(a - r).abs().max().item() / r.abs().max().clamp_min(1e-30).item() for a, r in zip(got, ref)]
        ms = median_ms(lambda fn=fn: step(fn), device, args.reps)
        rows.append({"impl": name, "fwd_bwd_ms": ms, "rel_diff_out_dseq_dw_db": diffs})
        print(f"{name:34s} {ms:8.3f} ms   rel. diff vs conv1d (out, dseq, dw, db): "
              + ", ".join(f"{x:.1e}" for x in diffs))
    if args.json:
        meta = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
                "shape": [args.batch, d, args.seq, K], "dtype": str(dtype)}
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
