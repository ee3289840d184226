"""Parity rows of the hyperbolic linear attention kernels for ``phase7fw doctor`` (smoke test)
and ``phase7fw doctor --verify``: the Triton kernel, and on a GPU where fla imports the fla
backend (:mod:`.fla_backend`, rows marked ``[fla]``), against the chunked torch form evaluated
in float64 on the same (bf16-rounded) inputs, forward and every gradient (q, k, v, c, decay),
with the numerics gate of :mod:`phase7fw.kernels.verify`; tangent norms reach past the
clamp (points at radius 0.999/sqrt(c)). Timed side by side with SDPA (cuDNN, full causal)
at the same shape on a GPU. Without fla, its rows are left out and the first row says so."""

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


def _backends(device) -> tuple[dict, str | None]:
    """{name: implementation} to check on ``device``: our Triton kernel, and fla's GLA
    (:mod:`.fla_backend`) on a GPU where fla imports; and a note when fla is left out."""
    from phase7fw.kernels._fla import with_fla
    from phase7fw.kernels.hyperbolic_linear_attention.fla_backend import hyperbolic_linear_attention_fla
    from phase7fw.kernels.hyperbolic_linear_attention.kernel import hyperbolic_linear_attention_triton

    return with_fla({"triton": hyperbolic_linear_attention_triton}, device, hyperbolic_linear_attention_fla)


def compare(B, H, T, D, device, dtype, case, timed=True, chunk_size=64, backends=None) -> list:
    """One row per implementation (``backends``: {name: fn}; default :func:`_backends`: the
    Triton kernel, then fla's where it runs), each against the same float64 reference on the
    same inputs and output gradient, forward and every gradient. Timed (``timed``): each
    implementation's fwd and fwd+bwd, and on a GPU SDPA at the same shape (once, in the first
    row; the others give their ratio to it and to the first row's fwd+bwd)."""
    from phase7fw.kernels.checks import _collect, _rel, gated_row
    from phase7fw.kernels.hyperbolic_linear_attention.reference import hyperbolic_linear_attention_chunked

    note = None
    if backends is None:
        backends, note = _backends(device)
    base = inputs(B, H, T, D, device, dtype)
    gout = torch.randn(base[2].shape, generator=torch.Generator(device="cpu").manual_seed(1)).to(device, dtype)
    ref_ins = [t.detach().double().requires_grad_() for t in base]
    ref = hyperbolic_linear_attention_chunked(*ref_ins, 1.0, chunk_size)
    ref_grads = torch.autograd.grad(ref, ref_ins, gout.double())
    ref = ref.detach()
    del ref_ins

    def one(name, fn, case):
        ins = [t.clone().requires_grad_() for t in base]
        out = fn(*ins, 1.0, chunk_size)
        grads = torch.autograd.grad(out, ins, gout)
        errors = {"out": _rel(out, ref)}
        for gname, a, b in zip(("dq", "dk", "dv", "dc", "ddecay"), grads, ref_grads):
            errors[gname] = _rel(a, b)
        row = gated_row(OP, case, errors, (out, *grads))
        del out, grads, ins
        if timed:
            row.ms.update(timings(base, device, chunk_size, fn, name, sdpa=not rows))
        return row

    rows, lead = [], next(iter(backends))
    for name, fn in backends.items():  # one failing implementation never hides another's row
        row_case = case if not rows else f"{case} [{name}]"
        row = _collect(OP, row_case, lambda name=name, fn=fn, row_case=row_case: one(name, fn, row_case))[0]
        if timed and rows:  # side by side with the first row: its SDPA time and its fwd+bwd
            first, fb = rows[0].ms, row.ms.get(f"{name}_fwd_bwd")
            if fb is not None and "sdpa_cudnn_causal_fwd_bwd" in first:
                row.ms["ratio_vs_sdpa"] = fb / first["sdpa_cudnn_causal_fwd_bwd"]
            fb_gpu = row.ms.get(f"{name}_fwd_bwd_gpu")
            if fb_gpu is not None and "sdpa_cudnn_causal_fwd_bwd_gpu" in first:
                row.ms["ratio_vs_sdpa_gpu"] = fb_gpu / first["sdpa_cudnn_causal_fwd_bwd_gpu"]
            if fb is not None and f"{lead}_fwd_bwd" in first:
                row.ms[f"ratio_vs_{lead}"] = fb / first[f"{lead}_fwd_bwd"]
        rows.append(row)
    if note:
        rows[0].ms["fla"] = note
    if timed and "fla" in backends and device.type == "cuda":
        row = rows[list(backends).index("fla")]
        if row.ok:
            row.ms.update(_gla_alone(B, H, T, D, device))
    return rows


def _gla_alone(B, H, T, D, device) -> dict:
    """fwd+bwd of fla's chunk_simple_gla alone on fp32 inputs of the two shapes that the fla
    backend hands it (fla_backend.gla_form): the pair term (D features, D values) and the
    running sums (a one-hot query and key, 2 D + 1 values): how much of the fla row's time is
    fla's, and how much the feature map and layout around it."""
    from phase7fw.kernels.checks import _bench
    from phase7fw.kernels.hyperbolic_linear_attention.fla_backend import SUMS_WIDTH, load_gla

    gla, ms = load_gla(), {}
    g = torch.Generator(device="cpu").manual_seed(2)
    for name, width, values in (("pair", D, D), ("sums", SUMS_WIDTH, 2 * D + 1)):
        q, k = (torch.randn(B, T, H, width, generator=g).div(width ** 0.5).to(device).requires_grad_()
                for _ in range(2))
        v = torch.randn(B, T, H, values, generator=g).to(device).requires_grad_()
        ld = (-0.2 * torch.rand(B, T, H, generator=g)).to(device).requires_grad_()
        gout = torch.randn(B, T, H, values, generator=g).to(device)

        def fwd_bwd():
            o, _ = gla(q, k, v, ld, scale=1.0)
            torch.autograd.grad(o, (q, k, v, ld), gout)

        ms[f"fla_gla_alone_{name}_K{width}_V{values}_fwd_bwd"] = _bench(fwd_bwd, device)
    return ms


def sdpa_causal_fwd_bwd(base, gout, backend=None):
    """A callable running SDPA (full causal) forward and backward on the q, k, v of ``base``
    with output gradient ``gout``: the yardstick of the kernel rows and of the launch sweep
    (benchmarks/kernels.py). ``backend``: an ``SDPBackend``, cuDNN by default."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = SDPBackend.CUDNN_ATTENTION if backend is None else backend
    qs, ks, vs = (t.clone().requires_grad_() for t in base[:3])

    def fwd_bwd():
        with sdpa_kernel(backend):
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True)
            torch.autograd.grad(o, (qs, ks, vs), gout)

    return fwd_bwd


def timings(base, device, chunk_size, fn, name, sdpa=True) -> dict:
    """fwd and fwd+bwd of the implementation ``fn``, keys ``<name>_fwd``, ``<name>_fwd_bwd``;
    on a GPU with ``sdpa`` also SDPA (cuDNN, full causal) at the same shape. On a GPU each
    fwd+bwd is also given as GPU time alone (``..._fwd_bwd_gpu``, :func:`gpu_time_ms`): the
    wall clock includes the host's work per call (our feature map is a dozen small torch ops
    in eager mode, which a compiled training step fuses and hides behind GPU work), so at small
    shapes the two ratios to SDPA differ; both are reported."""
    from phase7fw.kernels.checks import _bench, gpu_time_ms

    ins = [t.clone().requires_grad_() for t in base]
    gout = torch.randn_like(base[2])

    def fwd_bwd():
        o = fn(*ins, 1.0, chunk_size)
        torch.autograd.grad(o, ins, gout)

    def fwd():
        with torch.no_grad():
            fn(*ins, 1.0, chunk_size)

    ms = {f"{name}_fwd": _bench(fwd, device), f"{name}_fwd_bwd": _bench(fwd_bwd, device)}
    if device.type == "cuda":
        ms[f"{name}_fwd_bwd_gpu"] = gpu_time_ms(fwd_bwd)
    if sdpa and device.type == "cuda":
        sdpa_fb = sdpa_causal_fwd_bwd(base, gout)
        try:
            ms["sdpa_cudnn_causal_fwd_bwd"] = _bench(sdpa_fb, device)
            ms["ratio_vs_sdpa"] = ms[f"{name}_fwd_bwd"] / ms["sdpa_cudnn_causal_fwd_bwd"]
            ms["sdpa_cudnn_causal_fwd_bwd_gpu"] = gpu_time_ms(sdpa_fb)
            ms["ratio_vs_sdpa_gpu"] = ms[f"{name}_fwd_bwd_gpu"] / ms["sdpa_cudnn_causal_fwd_bwd_gpu"]
        except Exception as exc:  # noqa: BLE001 - a backend that cannot run this shape
            ms["sdpa_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
    return ms


def smoke_rows(device: torch.device) -> list:
    """Compile and run forward + backward on a tiny fp32 input (odd length, two value tiles):
    the Triton kernel, and on a GPU fla's GLA where fla imports."""
    from phase7fw.kernels.checks import _collect

    return _collect(OP, "tiny", lambda: compare(1, 2, 37, 40, device, torch.float32, "tiny", timed=False,
                                                chunk_size=16), first_call=True)


def verify_rows(device: torch.device, quick: bool = False) -> list:
    """bf16 at the benchmark shape (B, 16, 1024, 128), at T = 4096 and 16384, and an odd
    length: the Triton kernel's rows, each followed by fla's where fla runs (``[fla]``)."""
    from phase7fw.kernels.checks import _collect

    B = 2 if quick else 8
    cases = [((B, 16, 1024, 128), f"bf16 ({B},16,1024,128)"),
             ((1, 16, 4096, 128), "bf16 (1,16,4096,128)"),
             ((1, 16, 16384, 128), "bf16 (1,16,16384,128)"),
             ((1, 4, 1000, 64), "bf16 (1,4,1000,64) odd T")]
    rows = []
    for shape, case in cases:
        rows += _collect(OP, case, lambda s=shape, case=case: compare(*s, device, torch.bfloat16, case))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


__all__ = ["compare", "inputs", "sdpa_causal_fwd_bwd", "smoke_rows", "timings", "verify_cases", "verify_rows"]


def verify_cases(device: torch.device, quick: bool = False) -> list:
    """One case (several rows): see :func:`verify_rows`."""
    return [lambda: verify_rows(device, quick)]
