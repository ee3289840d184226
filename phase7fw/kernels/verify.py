"""Kernel checks behind ``phase7fw doctor`` (smoke test) and ``phase7fw doctor --verify``.

``smoke(device)``: every registered kernel compiles and runs forward + backward on a tiny
input, finite results. ``verify(device)``: every kernel against its torch reference evaluated
in float64 on the same (bf16-rounded) fresh random inputs, forward and every gradient, at
real shapes, with the numerics gate of design/PERFORMANCE.md:

* relative error (||x - x_ref|| / ||x_ref||) <= 1e-2 for outputs and gradients, zero NaN/Inf;
* hyperbolic distances: p99 relative error <= 1e-2 against fp64 for points up to Euclidean
  radius 0.999/sqrt(c) (read from the kernel's row log-sum-exp with window 1, where the
  only key of query i is k_i, so lse_i = -tau d(q_i, k_i)).

Timings (median of ``triton.testing.do_bench``) of the kernel and of SDPA at the same shape
are reported next to each row. Nothing here imports Triton before it is called.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

__all__ = ["Row", "smoke", "verify", "format_table"]

GATE = 1e-2


@dataclass
class Row:
    op: str
    case: str
    ok: bool
    detail: str = ""
    errors: dict = field(default_factory=dict)
    ms: dict = field(default_factory=dict)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    den = b.norm().item()
    return (a - b).norm().item() / (den if den > 0 else 1.0)


def _finite(*ts) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in ts if t is not None)


def gated_row(op: str, case: str, errors: dict, outputs, ok: bool = True) -> "Row":
    """The row of a parity check: it passes when every output is finite, every error is
    within GATE and ``ok`` (a check's extra condition) holds."""
    finite = _finite(*outputs)
    return Row(op, case, finite and ok and all(e <= GATE for e in errors.values()),
               "" if finite else "NaN/Inf", errors)


def _bench(fn, device) -> float:
    if device.type != "cuda":
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=100))


def gpu_time_ms(fn, reps: int = 20) -> float:
    """GPU time of ``fn`` in ms, without the Python and launch overhead that the wall-clock
    numbers carry at small sizes (a training step hides it behind other GPU work): the GPU is
    kept busy while the CPU queues all the reps, then the reps are timed with CUDA events.
    (Not a CUDA-graph replay: capturing the checks' autograd calls left torch 2.11's CUDA RNG
    refusing later random draws.)"""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(200_000_000)  # ~0.1 s of spinning: longer than queueing the reps takes
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def peak_extra_mib(fn, device=None) -> float:
    """Peak CUDA memory that ``fn`` allocates above what is allocated before it, in MiB."""
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


# ---------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------


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


def ssm_inputs(b, h, T, dv, r, device, dtype=torch.bfloat16, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(b, h, T, dv, generator=g).to(dtype)
    Bm = (torch.randn(b, h, T, r, generator=g) * r**-0.5)
    Cm = (torch.randn(b, h, T, r, generator=g) * r**-0.5)
    ld = -torch.rand(b, h, T, generator=g) * 0.2  # decays exp(-0.2)..1
    return x.to(device), Bm.to(device), Cm.to(device), ld.to(device)


# ---------------------------------------------------------------------------------------
# checks
# ---------------------------------------------------------------------------------------


def _check_attention(B, H, T, D, window, device, dtype, case, timings=True, score="distance") -> Row:
    from phase7fw.components.phase7.attention import hyperbolic_attention_reference
    from phase7fw.kernels.hyperbolic_attention import hyperbolic_attention_triton
    q, k, v, c, tau = attention_inputs(B, H, T, D, device, dtype)
    ins = [t.clone().requires_grad_() for t in (q, k, v, c, tau)]
    out = hyperbolic_attention_triton(*ins, window, score=score)
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

    from phase7fw.kernels.hyperbolic_attention import hyperbolic_attention_triton
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
    from phase7fw import geometry
    from phase7fw.kernels.hyperbolic_attention import hyperbolic_attention_fwd
    H = 4
    q, k, v, c, _ = attention_inputs(1, H, n, D, device, torch.bfloat16, max_atanh=4.5, seed=1)
    # near-parallel and near-equal pairs too: the hard cases for the <q,k>-only form
    k[:, :, : n // 4] = (q[:, :, : n // 4].float() * (1 + 0.05 * torch.randn_like(q[:, :, : n // 4].float()))).to(k.dtype)
    tau = torch.ones(H, device=device)
    _, _, lse2 = hyperbolic_attention_fwd(q, k, v, c.float().contiguous(), tau, 1, "distance")
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


def _check_ssm(b, h, T, dv, r, device, dtype, case, timings=True) -> Row:
    from phase7fw.components.phase7.ssm import ar_ssm_scan_reference
    from phase7fw.kernels.ar_ssm_scan import ar_ssm_scan_triton

    x, Bm, Cm, ld = ssm_inputs(b, h, T, dv, r, device, dtype)
    ins = [t.clone().requires_grad_() for t in (x, Bm, Cm, ld)]
    y = ar_ssm_scan_triton(*ins)
    gy = torch.randn_like(y)
    grads = torch.autograd.grad(y, ins, gy)
    ref_ins = [t.detach().double().requires_grad_() for t in (x, Bm, Cm, ld)]
    ref = ar_ssm_scan_reference(*ref_ins)
    ref_grads = torch.autograd.grad(ref, ref_ins, gy.double())
    errors = {"out": _rel(y, ref)}
    for name, a, bb in zip(("dx", "dB", "dC", "dlog_decay"), grads, ref_grads):
        errors[name] = _rel(a, bb)
    row = gated_row("ar_ssm_scan", case, errors, (y, *grads))
    if timings:
        def tri():
            o = ar_ssm_scan_triton(*ins)
            torch.autograd.grad(o, ins, gy)

        def refr():
            o = ar_ssm_scan_reference(*ins)
            torch.autograd.grad(o, ins, gy)

        row.ms = {"triton_fwd_bwd": _bench(tri, device), "reference_fwd_bwd": _bench(refr, device)}
    return row


# ---------------------------------------------------------------------------------------


def smoke(device: torch.device) -> list[Row]:
    """Compile and run each kernel on a tiny input, forward and backward."""
    rows = []
    checks = [
        ("hyperbolic_attention", lambda: _check_attention(1, 2, 40, 32, 16, device, torch.float32, "tiny", timings=False)),
        ("ar_ssm_scan", lambda: _check_ssm(1, 2, 150, 32, 8, device, torch.float32, "tiny", timings=False)),
    ]
    checks += [(op, lambda op=op: _module(op).smoke_rows(device)) for op in SELF_CHECKING]
    for op, fn in checks:
        rows += _collect(op, "tiny", fn, first_call=True)
    return rows


#: Kernel modules that carry their own checks: ``smoke_rows(device)`` and
#: ``verify_rows(device, quick)``, each returning a list of :class:`Row`.
SELF_CHECKING = ("rmsnorm", "swiglu", "linear_cross_entropy", "htt_embedding", "hyperbolic_linear_attention")


def _module(op: str):
    import importlib

    return importlib.import_module(f"phase7fw.kernels.{op}")


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]


def _collect(op: str, case: str, produce, *, first_call: bool = False) -> list[Row]:
    """The rows of ``produce()`` (a Row or a list of them), or one failed Row naming the
    exception: every kernel gets reported, one failure never hides the others. ``first_call``
    adds the wall time including Triton's compilation (the smoke test's number)."""
    t0 = time.perf_counter()
    try:
        got = produce()
        rows = got if isinstance(got, list) else [got]
    except Exception as exc:  # noqa: BLE001 - a kernel that cannot run is a failed row
        rows = [Row(op, case, False, _error(exc))]
    if first_call:
        for row in rows:
            row.ms.setdefault("first_call_incl_compile", (time.perf_counter() - t0) * 1e3)
    return rows


def guarded(op: str, case: str, check, *, first_call: bool = False) -> Row:
    """``check()`` -> Row, or a failed Row naming the exception (see :func:`_collect`)."""
    return _collect(op, case, check, first_call=first_call)[0]


def verify(device: torch.device, quick: bool = False, only: list[int] | None = None) -> list[Row]:
    """Every kernel against its fp64 reference at real shapes in bf16, with timings."""
    B = 2 if quick else 4
    attn, ssm, bf16 = "hyperbolic_attention", "ar_ssm_scan", torch.bfloat16
    cases = [  # (op, check); tests/gpu runs them one by one by index
        (attn, lambda: _check_attention(B, 16, 1024, 128, 1024, device, bf16, f"bf16 ({B},16,1024,128) full causal")),
        (attn, lambda: _check_attention(B, 16, 1024, 128, 256, device, bf16, f"bf16 ({B},16,1024,128) window 256")),
        (attn, lambda: _check_attention(1, 4, 1000, 64, 100, device, bf16, "bf16 (1,4,1000,64) window 100, odd T")),
        (attn, lambda: _check_distance_gate(device)),
        (ssm, lambda: _check_ssm(B, 8, 1024, 256, 16, device, bf16, f"bf16 x ({B},8,1024,256) r=16")),
        (ssm, lambda: _check_ssm(1, 4, 1000, 64, 12, device, bf16, "bf16 x (1,4,1000,64) r=12, odd T")),
    ]
    # then one per self-checking module (each may return several rows)
    cases += [(op, lambda op=op: _module(op).verify_rows(device, quick)) for op in SELF_CHECKING]
    cases += [  # the other attention scores (attention.score in the recipe)
        (attn, lambda: _check_attention(B, 16, 1024, 128, 1024, device, bf16,
                                        f"bf16 ({B},16,1024,128) full causal, squared_distance", score="squared_distance")),
        (attn, lambda: _check_attention(B, 16, 1024, 128, 256, device, bf16,
                                        f"bf16 ({B},16,1024,128) window 256, dot_distance", score="dot_distance")),
    ]
    rows = []
    for i, (op, fn) in enumerate(cases):
        if only is not None and i not in only:
            continue
        rows += _collect(op, "?", fn)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def format_table(rows: list[Row]) -> str:
    lines = ["| op | case | result | errors (rel. to fp64) | ms |", "|---|---|---|---|---|"]
    for r in rows:
        errs = ", ".join(f"{k} {v:.1e}" for k, v in r.errors.items())
        ms = ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in r.ms.items())
        lines.append(f"| {r.op} | {r.case} | {'PASS' if r.ok else 'FAIL'} {r.detail} | {errs} | {ms} |")
    return "\n".join(lines)
