"""Parity rows of the fused linear cross-entropy kernel for ``phase7fw doctor`` and ``doctor --verify``:
loss and both gradients against float64 full-logits cross-entropy on the same inputs, with
fwd+bwd timings (triton, checkpointed chunked reference, full logits) and, on CUDA, peak memory."""

from __future__ import annotations

import torch

from phase7fw.kernels.cross_entropy.reference import chunked_cross_entropy
from phase7fw.kernels.checks import _bench, _rel, gated_row, guarded, peak_extra_mib

IGNORE_INDEX = -100


def linear_cross_entropy_triton(*args, **kwargs):
    from phase7fw.kernels.cross_entropy.kernel import linear_cross_entropy_triton as impl

    return impl(*args, **kwargs)


def default_chunk_tokens(vocab: int, itemsize: int) -> int:
    from phase7fw.kernels.cross_entropy.kernel import default_chunk_tokens as impl

    return impl(vocab, itemsize)


def _inputs(N, D, V, device, dtype, ignore_frac=0.0, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    h = torch.randn(N, D, generator=g)
    w = torch.randn(V, D, generator=g) * D**-0.5 * 2.0  # logits std ~2: a peaked softmax
    y = torch.randint(0, V, (N,), generator=g)
    if ignore_frac:
        y[torch.rand(N, generator=g) < ignore_frac] = IGNORE_INDEX
    return h.to(dtype).to(device), w.to(dtype).to(device), y.to(device)


def _reference64(h, w, y):
    """Float64 full-logits cross-entropy on the same (rounded) values: loss, dh, dw."""
    import torch.nn.functional as F

    h64 = h.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    loss = F.cross_entropy(h64 @ w64.t(), y)
    dh, dw = torch.autograd.grad(loss, (h64, w64))
    return loss.detach(), dh, dw


def _check(N, D, V, chunk, device, dtype, case, ignore_frac=0.0, autocast=False, timings=False):
    h, w, y = _inputs(N, D, V, device, dtype, ignore_frac)
    hi, wi = h.clone().requires_grad_(), w.clone().requires_grad_()
    ctx = torch.autocast(device.type, dtype=torch.bfloat16) if autocast else torch.autocast(device.type, enabled=False)
    with ctx:
        loss = linear_cross_entropy_triton(hi, wi, y, chunk)
    dh, dw = torch.autograd.grad(loss, (hi, wi))
    ref, rdh, rdw = _reference64(h, w, y)
    errors = {"loss": _rel(loss, ref), "dhidden": _rel(dh, rdh), "dweight": _rel(dw, rdw)}
    del ref, rdh, rdw
    row = gated_row("cross_entropy", case, errors, (loss, dh, dw))
    if timings:
        row.ms.update(_time(hi, wi, y, chunk, device, ctx))
    return row


def _time(h, w, y, chunk, device, ctx) -> dict:
    import torch.nn.functional as F


    ref_chunk = chunk or default_chunk_tokens(w.shape[0], 2)
    fns = {
        "triton": lambda: linear_cross_entropy_triton(h, w, y, chunk),
        "reference_chunked": lambda: chunked_cross_entropy(h, w, y, ref_chunk),
        "reference_full": lambda: F.cross_entropy(F.linear(h, w).float(), y),
    }
    ms = {}
    for name, fn in fns.items():
        def fwd_bwd(fn=fn):
            with ctx:
                loss = fn()
            torch.autograd.grad(loss, (h, w))

        ms[f"{name}_fwd_bwd"] = _bench(fwd_bwd, device)
        if device.type == "cuda":  # peak bytes above the inputs, gradients included
            ms[f"{name}_peak_extra_MiB"] = peak_extra_mib(fwd_bwd, device)
    return ms


def _guarded(case, fn):
    return guarded("cross_entropy", case, fn)


def smoke_rows(device: torch.device) -> list:
    """Tiny fp32 case (odd sizes, ignored targets, chunks not dividing N): loss and both
    gradients against float64, finite."""
    device = torch.device(device)
    case = "tiny"  # fp32, 37 x 24, V=131, chunks of 16, ignored targets
    return [_guarded(case, lambda: _check(37, 24, 131, 16, device, torch.float32, case, ignore_frac=0.2))]


def verify_rows(device: torch.device, quick: bool = False) -> list:
    """Real shape in bf16 against float64 full cross-entropy on the same inputs, gate 1e-2 on
    loss, dhidden and dweight, with fwd+bwd timings (triton, checkpointed chunked reference,
    full logits) and, on CUDA, the peak memory above the inputs of each."""
    device = torch.device(device)
    N = 2 * 1024 if quick else 8 * 1024
    cases = [
        (f"bf16 hidden ({N},2048), V=32000, default chunk", lambda c: _check(N, 2048, 32000, 0, device, torch.bfloat16, c, timings=True)),
        ("bf16 (4093,2048), V=32000, chunk 1000, 10% ignored", lambda c: _check(4093, 2048, 32000, 1000, device, torch.bfloat16, c, ignore_frac=0.1)),
        ("fp32 (2048,2048) under bf16 autocast, V=32000", lambda c: _check(2048, 2048, 32000, 0, device, torch.float32, c, autocast=True)),
    ]
    rows = []
    for case, fn in cases:
        rows.append(_guarded(case, lambda: fn(case)))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def verify_cases(device: torch.device, quick: bool = False) -> list:
    """One case (several rows): see :func:`verify_rows`."""
    return [lambda: verify_rows(device, quick)]
