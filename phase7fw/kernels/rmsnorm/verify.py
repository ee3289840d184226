"""Parity rows of the RMSNorm kernel for ``phase7fw doctor`` and ``doctor --verify``: forward and both
gradients against the float64 reference, timed next to the torch reference."""

from __future__ import annotations

import torch

from phase7fw.kernels.rmsnorm.reference import rmsnorm_reference
from phase7fw.kernels.checks import _bench, _rel, gated_row, gpu_time_ms, guarded


def rmsnorm_triton(*args, **kwargs):
    from phase7fw.kernels.rmsnorm.kernel import rmsnorm_triton as impl

    return impl(*args, **kwargs)


def timings(impls: dict, device: torch.device) -> dict:
    """ms of each ``{name: (fwd, fwd_bwd)}`` callable: ``verify._bench`` (eager, what a step
    sees, including the CPU cost of launching) and, on CUDA, ``verify.gpu_time_ms``
    (``<name>_fwd_bwd_gpu``: the kernels' GPU time alone; at these sizes eager is launch-bound)."""
    ms = {}
    for name, (fwd, fwd_bwd) in impls.items():
        ms[f"{name}_fwd"] = _bench(fwd, device)
        ms[f"{name}_fwd_bwd"] = _bench(fwd_bwd, device)
        if device.type == "cuda":
            ms[f"{name}_fwd_bwd_gpu"] = gpu_time_ms(fwd_bwd)
    return ms


def timed_calls(calls: dict, ins, gy, device: torch.device) -> dict:
    """:func:`timings` of each ``{name: call}`` (``call()`` computes the op from the inputs
    ``ins``): the forward alone and forward + backward (the gradients of ``ins`` for ``gy``)."""
    impls = {}
    for name, call in calls.items():
        def fwd(call=call):
            with torch.no_grad():
                call()

        def fwd_bwd(call=call):
            torch.autograd.grad(call(), ins, gy)

        impls[name] = (fwd, fwd_bwd)
    return timings(impls, device)


def _check(shape, dtype, device, case, timed, eps=1e-5, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(shape, generator=g).to(dtype).to(device)
    w = (1 + 0.1 * torch.randn(shape[-1], generator=g)).to(dtype).to(device)
    gy = torch.randn(shape, generator=g).to(dtype).to(device)
    ins = [x.clone().requires_grad_(), w.clone().requires_grad_()]
    y = rmsnorm_triton(*ins, eps)
    grads = torch.autograd.grad(y, ins, gy)
    ref_ins = [x.double().requires_grad_(), w.double().requires_grad_()]
    ref = rmsnorm_reference(*ref_ins, eps)
    ref_grads = torch.autograd.grad(ref, ref_ins, gy.double())
    errors = {"out": _rel(y, ref), "dx": _rel(grads[0], ref_grads[0]), "dweight": _rel(grads[1], ref_grads[1])}
    row = gated_row("rmsnorm", case, errors, (y, *grads))
    if timed:
        row.ms.update(timed_calls({name: lambda fn=fn: fn(*ins, eps) for name, fn in
                                   (("triton", rmsnorm_triton), ("reference", rmsnorm_reference))}, ins, gy, device))
    return row


def smoke_rows(device: torch.device) -> list:
    """Compile and run forward + backward on a tiny fp32 input (odd sizes)."""
    return [guarded("rmsnorm", "tiny", lambda: _check((3, 5, 37), torch.float32, device, "tiny", timed=False),
                    first_call=True)]


def verify_rows(device: torch.device, quick: bool = False) -> list:
    """bf16 at real shapes against the fp64 reference, forward and both gradients, timed."""
    rows_n = (2 if quick else 8) * 1024
    cases = [((rows_n, 2048), f"bf16 ({rows_n}, 2048)"), ((3, 333, 1000), "bf16 (3, 333, 1000) odd sizes")]
    return [guarded("rmsnorm", case, lambda shape=shape, case=case: _check(shape, torch.bfloat16, device, case, timed=True))
            for shape, case in cases]


def verify_cases(device: torch.device, quick: bool = False) -> list:
    """One case (several rows): see :func:`verify_rows`."""
    return [lambda: verify_rows(device, quick)]
