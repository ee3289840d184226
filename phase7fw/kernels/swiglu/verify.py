"""Parity rows of the SwiGLU kernel for ``phase7fw doctor`` and ``doctor --verify``: forward and both
gradients against the float64 reference, timed next to the torch reference."""

from __future__ import annotations

import torch

from phase7fw.kernels.rmsnorm.verify import timed_calls
from phase7fw.kernels.swiglu.reference import swiglu_reference
from phase7fw.kernels.checks import _rel, gated_row, guarded


def swiglu_triton(*args, **kwargs):
    from phase7fw.kernels.swiglu.kernel import swiglu_triton as impl

    return impl(*args, **kwargs)


def _check(rows, n, dtype, device, case, timed, seed=0):
    """gate and up as the two halves of one (rows, 2n) projection output, as in the model."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    h = (2 * torch.randn(rows, 2 * n, generator=gen)).to(dtype).to(device)
    gy = torch.randn(rows, n, generator=gen).to(dtype).to(device)
    h_t = h.clone().requires_grad_()
    y = swiglu_triton(*h_t.chunk(2, dim=-1))
    (grad,) = torch.autograd.grad(y, h_t, gy)
    h_r = h.double().requires_grad_()
    ref = swiglu_reference(*h_r.chunk(2, dim=-1))
    (ref_grad,) = torch.autograd.grad(ref, h_r, gy.double())
    errors = {"out": _rel(y, ref), "dgate": _rel(grad[:, :n], ref_grad[:, :n]),
              "dup": _rel(grad[:, n:], ref_grad[:, n:])}
    row = gated_row("swiglu", case, errors, (y, grad))
    if timed:  # timed like the RMSNorm rows
        row.ms.update(timed_calls({name: lambda fn=fn: fn(*h_t.chunk(2, dim=-1)) for name, fn in
                                   (("triton", swiglu_triton), ("reference", swiglu_reference))}, h_t, gy, device))
    return row


def smoke_rows(device: torch.device) -> list:
    """Compile and run forward + backward on a tiny fp32 input (odd sizes)."""
    return [guarded("swiglu", "tiny", lambda: _check(15, 37, torch.float32, device, "tiny", timed=False),
                    first_call=True)]


def verify_rows(device: torch.device, quick: bool = False) -> list:
    """bf16 at real shapes against the fp64 reference, forward and both gradients, timed."""
    rows_n = (2 if quick else 8) * 1024
    cases = [(rows_n, 4096, f"bf16 ({rows_n}, 4096)"), (999, 1000, "bf16 (999, 1000) odd sizes")]
    return [guarded("swiglu", case, lambda rows=rows, n=n, case=case: _check(rows, n, torch.bfloat16, device, case,
                                                                              timed=True))
            for rows, n, case in cases]


def verify_cases(device: torch.device, quick: bool = False) -> list:
    """One case (several rows): see :func:`verify_rows`."""
    return [lambda: verify_rows(device, quick)]
