"""Parity rows of the hyperbolic attention kernel for ``phase7fw doctor`` (smoke test) and
``phase7fw doctor --verify``: the Triton kernel against the blockwise reference evaluated in
float64 on the same (bf16-rounded) inputs, forward and every gradient (q, k, v, c, tau), and
the distance gate (p99 relative error of the per-pair distances <= 1e-2 for points up to
radius 0.999/sqrt(c), read from the kernel's row log-sum-exp with window 1, where the only key
of query i is k_i, so lse_i = -tau d(q_i, k_i)). Timed next to SDPA (cuDNN, full causal) on a GPU.
"""

from __future__ import annotations

import math

import torch

from phase7fw.kernels.hyperbolic_attention import TritonConfig, geometry
from phase7fw.kernels.hyperbolic_attention.reference import hyperbolic_attention_reference
from phase7fw.kernels.checks import GATE, Row, _bench, _finite, _rel, gated_row, guarded

OP = "hyperbolic_attention"


def hyperbolic_attention_triton(*args, **kwargs):
    from phase7fw.kernels.hyperbolic_attention.kernel import hyperbolic_attention_triton as impl

    return impl(*args, **kwargs)


def hyperbolic_attention_fwd(*args, **kwargs):
    from phase7fw.kernels.hyperbolic_attention.kernel import hyperbolic_attention_fwd as impl

    return impl(*args, **kwargs)


def attention_inputs(B, H, T, D, device, dtype=torch.bfloat16, max_atanh=4.5, seed=0):
    """q, k with sqrt(c)|u| spread over [0, max_atanh] (beyond 3.8 the tangent clamp acts:
    points at radius 0.999/sqrt(c)), v ~ N(0,1), per-head c in [0.5, 2] and tau in [0.5, 2]."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    c = 0.5 + 1.5 * torch.rand(H, generator=g, dtype=torch.float64)
    tau = 0.5 + 1.5 * torch.rand(H, generator=g, dtype=torch.float64)

    def tangent():
        u = torch.randn(B, H, T, D, generator=g, dtype=torch.float64)
        u = u / u.norm(dim=-1, keepdim=True)
        radius = max_atanh * torch.rand(B, H, T, 1, generator=g, dtype=torch.float64)
        return u * radius / c.sqrt().view(1, H, 1, 1)

    q, k = tangent(), tangent()
    v = torch.randn(B, H, T, D, generator=g, dtype=torch.float64)
    to = dict(device=device)
    return (q.to(dtype).to(**to), k.to(dtype).to(**to), v.to(dtype).to(**to),
            c.float().to(**to), tau.float().to(**to))


def _check_attention(B, H, T, D, window, device, dtype, case, timings=True, score="distance",
                     tuning=None) -> Row:
    """The Triton kernel (launch configuration ``tuning``; None: the defaults) against the
    float64 reference: output and every gradient, gated; optionally timed."""
    q, k, v, c, tau = attention_inputs(B, H, T, D, device, dtype)
    ins = [t.clone().requires_grad_() for t in (q, k, v, c, tau)]
    out = hyperbolic_attention_triton(*ins, window, score=score, tuning=tuning)
    gout = torch.randn_like(out)
    grads = torch.autograd.grad(out, ins, gout)
    ref_ins = [t.detach().double().requires_grad_() for t in (q, k, v, c, tau)]
    ref = hyperbolic_attention_reference(*ref_ins, window, score=score)
    ref_grads = torch.autograd.grad(ref, ref_ins, gout.double())
    errors = {"out": _rel(out, ref)}
    for name, a, b in zip(("dq", "dk", "dv", "dc", "dtau"), grads, ref_grads):
        errors[name] = _rel(a, b)
    row = gated_row("hyperbolic_attention", case, errors, (out, *grads))
    del ref, ref_grads, ref_ins
    if timings:
        row.ms.update(_time_attention(q, k, v, c, tau, window, device, score))
    return row


def _time_attention(q, k, v, c, tau, window, device, score="distance") -> dict:
    import torch.nn.functional as F

    ins = [t.clone().requires_grad_() for t in (q, k, v, c, tau)]
    gout = torch.randn_like(v)

    def triton_fb():
        o = hyperbolic_attention_triton(*ins, window, score=score)
        torch.autograd.grad(o, ins, gout)

    def triton_f():
        with torch.no_grad():
            hyperbolic_attention_triton(*ins, window, score=score)

    ms = {"triton_fwd": _bench(triton_f, device), "triton_fwd_bwd": _bench(triton_fb, device)}
    if device.type == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))

        def sdpa_fb():  # full causal SDPA (cuDNN backend) at the same shape, as the yardstick
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True)
                torch.autograd.grad(o, (qs, ks, vs), gout)

        try:
            ms["sdpa_cudnn_causal_fwd_bwd"] = _bench(sdpa_fb, device)
        except Exception as exc:  # noqa: BLE001 - a backend that cannot run this shape
            ms["sdpa_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
    return ms


def _check_distance_gate(device, n=4096, D=128) -> Row:
    """Per-pair distances of the kernel (window 1: lse_i = -tau d(q_i, k_i) * log2 e) against
    geometry.dist of the fp64 ball points, at radii up to 0.999/sqrt(c) (and beyond: clamped)."""
    H = 4
    q, k, v, c, _ = attention_inputs(1, H, n, D, device, torch.bfloat16, max_atanh=4.5, seed=1)
    # near-parallel and near-equal pairs too: the hard cases for the <q,k>-only form
    k[:, :, : n // 4] = (q[:, :, : n // 4].float() * (1 + 0.05 * torch.randn_like(q[:, :, : n // 4].float()))).to(k.dtype)
    tau = torch.ones(H, device=device)
    from phase7fw.kernels.hyperbolic_attention.kernel import gpu_tiles

    tiles = gpu_tiles(TritonConfig())
    _, _, lse2 = hyperbolic_attention_fwd(q, k, v, c.float().contiguous(), tau, 1, "distance", tiles, False)
    d = -lse2.double() * math.log(2.0)
    edge = 1.0 - math.tanh(geometry.MAX_TANGENT_ATANH)
    c64 = c.double().view(H, 1)
    x = geometry.project(geometry.expmap0(q.double(), c64), c64, eps=edge)
    y = geometry.project(geometry.expmap0(k.double(), c64), c64, eps=edge)
    d_ref = geometry.dist(x, y, c64)  # (1, H, n)
    rel = ((d - d_ref).abs() / d_ref.abs().clamp_min(1e-6)).flatten()
    p99 = torch.quantile(rel.float(), 0.99).item()
    finite = _finite(d)
    radius = (x.norm(dim=-1) * c64.sqrt()).max().item()
    ok = finite and p99 <= GATE
    return Row("hyperbolic_attention", f"distance gate, bf16, radius <= {radius:.4f}/sqrt(c)", ok,
               "" if finite else "NaN/Inf", {"p99_rel": p99, "max_rel": rel.max().item()})


def smoke_rows(device: torch.device) -> list:
    """Compile and run the kernel on a tiny fp32 input, forward and backward."""
    return [guarded(OP, "tiny", lambda: _check_attention(1, 2, 40, 32, 16, device, torch.float32, "tiny", timings=False),
                    first_call=True)]


def verify_cases(device: torch.device, quick: bool = False) -> list:
    """Real shapes in bf16: full causal, window 256, odd T; the distance gate; then the other
    scores (squared_distance, dot_distance). Each case gives one row."""
    B, bf16 = (2 if quick else 4), torch.bfloat16
    return [
        lambda: _check_attention(B, 16, 1024, 128, 1024, device, bf16, f"bf16 ({B},16,1024,128) full causal"),
        lambda: _check_attention(B, 16, 1024, 128, 256, device, bf16, f"bf16 ({B},16,1024,128) window 256"),
        lambda: _check_attention(1, 4, 1000, 64, 100, device, bf16, "bf16 (1,4,1000,64) window 100, odd T"),
        lambda: _check_distance_gate(device),
        lambda: _check_attention(B, 16, 1024, 128, 1024, device, bf16,
                                 f"bf16 ({B},16,1024,128) full causal, squared_distance", score="squared_distance"),
        lambda: _check_attention(B, 16, 1024, 128, 256, device, bf16,
                                 f"bf16 ({B},16,1024,128) window 256, dot_distance", score="dot_distance"),
    ]
