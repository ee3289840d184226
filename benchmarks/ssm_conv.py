"""The AR-SSM's causal depthwise convolution, forward + backward, as the model calls it on
u (b, t, d): the `causal_conv` op's torch reference (transpose, pad, ``F.conv1d(groups=d)``:
cuDNN on a GPU, transpose back), the same K shifted multiply-adds in fp32 eager and under
torch.compile, and the op's Triton kernel (`[kernels] causal_conv = "triton"`), at the 1.5B
model's shape (issue 16: what replaces cuDNN's depthwise path? benchmarks/RESULTS.md).

    python benchmarks/ssm_conv.py [--batch 8] [--seq 1024] [--d-model 2048] [--kernel 4] [--json PATH]

bf16 autocast on a GPU (what training runs), fp32 on a CPU (tiny default shape, the Triton row
only under TRITON_INTERPRET=1; says so). Prints the median milliseconds of forward + backward
per call (one layer) and the largest difference of each output and gradient from the reference's.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from phase7fw.kernels.causal_conv import causal_conv_reference


def shifted_adds(u, weight, bias):
    """causal_conv(u (b, t, d), weight (d, 1, K), bias) as K shifted multiply-adds, accumulated
    in fp32 and rounded once (under autocast: inputs and result in its dtype)."""
    out_dtype = torch.promote_types(u.dtype, weight.dtype)
    if torch.is_autocast_enabled(u.device.type):
        out_dtype = torch.get_autocast_dtype(u.device.type)
        u, weight, bias = u.to(out_dtype), weight.to(out_dtype), bias.to(out_dtype)
    K, T = weight.shape[-1], u.shape[1]
    padded = F.pad(u.float(), (0, 0, K - 1, 0))
    w = weight.reshape(-1, K).float()
    out = bias.float()
    for k in range(K):
        out = out + w[:, k] * padded[:, k : k + T]
    return out.to(out_dtype)


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
    u = torch.randn(args.batch, args.seq, d, device=device, dtype=dtype, generator=g)
    w = torch.randn(d, 1, K, device=device, generator=g) / K**0.5
    b = torch.randn(d, device=device, generator=g)
    dy = torch.randn(args.batch, args.seq, d, device=device, dtype=dtype, generator=g)

    def step(fn):
        ui, wi, bi = (t.detach().requires_grad_() for t in (u, w, b))
        with torch.autocast(device.type, dtype=dtype, enabled=cuda):
            out = fn(ui, wi, bi)
        out.backward(dy)
        return out.detach().float(), ui.grad.float(), wi.grad, bi.grad

    ref = step(causal_conv_reference)
    rows = []
    impls = [("reference (F.conv1d, cuDNN on CUDA)", causal_conv_reference),
             ("shifted adds, eager", shifted_adds), ("shifted adds, torch.compile", torch.compile(shifted_adds))]
    if cuda or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        from phase7fw.kernels.causal_conv.kernel import causal_conv_triton

        impls.append(("triton (phase7fw causal_conv)", causal_conv_triton))
    else:
        print("no CUDA device and TRITON_INTERPRET unset: no Triton row")
    for name, fn in impls:
        got = step(fn)
        diffs = [(a - r).abs().max().item() / r.abs().max().clamp_min(1e-30).item() for a, r in zip(got, ref)]
        ms = median_ms(lambda fn=fn: step(fn), device, args.reps)
        rows.append({"impl": name, "fwd_bwd_ms": ms, "rel_diff_out_du_dw_db": diffs})
        print(f"{name:36s} {ms:8.3f} ms   rel. diff vs reference (out, du, dw, db): "
              + ", ".join(f"{x:.1e}" for x in diffs))
    if args.json:
        meta = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
                "shape (b, t, d, K)": [args.batch, args.seq, d, K], "dtype": str(dtype)}
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
