"""Parity rows of the hyperbolic linear attention kernel for ``phase7fw doctor`` (smoke test)
and ``phase7fw doctor --verify``: the Triton kernel against the chunked torch form evaluated
in float64 on the same (bf16-rounded) inputs, forward and every gradient (q, k, v, c, decay),
with the numerics gate of :mod:`phase7fw.kernels.verify`; tangent norms reach past the
clamp (points at radius 0.999/sqrt(c)). Timed next to SDPA (cuDNN, full causal) at the same
shape on a GPU."""

from __future__ import annotations

import torch

OP = "hyperbolic_linear_attention"


def inputs(B, H, T, D, device, dtype=torch.bfloat16, max_atanh=4.5, seed=0):
    """q, k with sqrt(c)|u| spread over [0, max_atanh] (the clamp acts beyond artanh 0.999 ~ 3.8),
    v ~ N(0, 1), per-head c in [0.5, 2], log-decays in [-0.2, 0]."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    c = 0.5 + 1.5 * torch.rand(H, generator=g, dtype=torch.float64)

    def tangent():
        u = torch.randn(B, H, T, D, generator=g, dtype=torch.float64)
        u = u / u.norm(dim=-1, keepdim=True)
        return u * max_atanh * torch.rand(B, H, T, 1, generator=g, dtype=torch.float64) / c.sqrt().view(1, H, 1, 1)

    q, k = tangent(), tangent()
    v = torch.randn(B, H, T, D, generator=g, dtype=torch.float64)
    ld = -0.2 * torch.rand(B, H, T, generator=g, dtype=torch.float64)
    return (q.to(dtype).to(device), k.to(dtype).to(device), v.to(dtype).to(device), c.float().to(device),
            ld.float().to(device))


def check(B, H, T, D, device, dtype, case, timed=True, chunk_size=64):
    from phase7fw.kernels.hyperbolic_linear_attention.kernel import hyperbolic_linear_attention_triton
    from phase7fw.kernels.hyperbolic_linear_attention.reference import hyperbolic_linear_attention_chunked
    from phase7fw.kernels.checks import _rel, gated_row

    base = inputs(B, H, T, D, device, dtype)
    ins = [t.clone().requires_grad_() for t in base]
    out = hyperbolic_linear_attention_triton(*ins, 1.0, chunk_size)
    gout = torch.randn_like(out)
    grads = torch.autograd.grad(out, ins, gout)
    ref_ins = [t.detach().double().requires_grad_() for t in base]
    ref = hyperbolic_linear_attention_chunked(*ref_ins, 1.0, chunk_size)
    ref_grads = torch.autograd.grad(ref, ref_ins, gout.double())
    errors = {"out": _rel(out, ref)}
    for name, a, b in zip(("dq", "dk", "dv", "dc", "ddecay"), grads, ref_grads):
        errors[name] = _rel(a, b)
    row = gated_row(OP, case, errors, (out, *grads))
    del ref, ref_grads, ref_ins
    if timed:
        row.ms.update(timings(base, device, chunk_size))
    return row


def timings(base, device, chunk_size=64) -> dict:
    """fwd and fwd+bwd of the kernel; on a GPU also SDPA (cuDNN, full causal) at the same shape."""
    import torch.nn.functional as F

    from phase7fw.kernels.hyperbolic_linear_attention.kernel import hyperbolic_linear_attention_triton
    from phase7fw.kernels.checks import _bench

    ins = [t.clone().requires_grad_() for t in base]
    gout = torch.randn_like(base[2])

    def fwd_bwd():
        o = hyperbolic_linear_attention_triton(*ins, 1.0, chunk_size)
        torch.autograd.grad(o, ins, gout)

    def fwd():
        with torch.no_grad():
            hyperbolic_linear_attention_triton(*ins, 1.0, chunk_size)

    ms = {"triton_fwd": _bench(fwd, device), "triton_fwd_bwd": _bench(fwd_bwd, device)}
    if device.type == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        qs, ks, vs = (t.clone().requires_grad_() for t in base[:3])

        def sdpa_fb():
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True)
                torch.autograd.grad(o, (qs, ks, vs), gout)

        try:
            ms["sdpa_cudnn_causal_fwd_bwd"] = _bench(sdpa_fb, device)
            ms["ratio_vs_sdpa"] = ms["triton_fwd_bwd"] / ms["sdpa_cudnn_causal_fwd_bwd"]
        except Exception as exc:  # noqa: BLE001 - a backend that cannot run this shape
            ms["sdpa_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
    return ms


def smoke_rows(device: torch.device) -> list:
    """Compile and run forward + backward on a tiny fp32 input (odd length, two value tiles)."""
    from phase7fw.kernels.checks import guarded

    return [guarded(OP, "tiny", lambda: check(1, 2, 37, 40, device, torch.float32, "tiny", timed=False, chunk_size=16),
                    first_call=True)]


def verify_rows(device: torch.device, quick: bool = False) -> list:
    """bf16 at the benchmark shape (B, 16, 1024, 128) and at T = 4096, and an odd length."""
    from phase7fw.kernels.checks import guarded

    B = 2 if quick else 8
    cases = [((B, 16, 1024, 128), f"bf16 ({B},16,1024,128)"),
             ((1, 16, 4096, 128), "bf16 (1,16,4096,128)"),
             ((1, 4, 1000, 64), "bf16 (1,4,1000,64) odd T")]
    return [guarded(OP, case, lambda s=shape, case=case: check(*s, device, torch.bfloat16, case))
            for shape, case in cases]


__all__ = ["check", "inputs", "smoke_rows", "timings", "verify_cases", "verify_rows"]


def verify_cases(device: torch.device, quick: bool = False) -> list:
    """One case (several rows): see :func:`verify_rows`."""
    return [lambda: verify_rows(device, quick)]
