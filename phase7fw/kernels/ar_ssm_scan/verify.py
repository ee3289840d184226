"""Parity rows of the AR-SSM scan kernel for ``phase7fw doctor`` and ``doctor --verify``: the
Triton scan against the chunked reference in float64 on the same inputs, forward and every
gradient (x, B, C, log_decay), timed next to the torch reference."""

from __future__ import annotations

import torch

from phase7fw.kernels.ar_ssm_scan.reference import ar_ssm_scan_reference
from phase7fw.kernels.checks import Row, _bench, _rel, gated_row, guarded

OP = "ar_ssm_scan"


def ar_ssm_scan_triton(*args, **kwargs):
    from phase7fw.kernels.ar_ssm_scan.kernel import ar_ssm_scan_triton as impl

    return impl(*args, **kwargs)


def ssm_inputs(b, h, T, dv, r, device, dtype=torch.bfloat16, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(b, h, T, dv, generator=g).to(dtype)
    Bm = (torch.randn(b, h, T, r, generator=g) * r**-0.5)
    Cm = (torch.randn(b, h, T, r, generator=g) * r**-0.5)
    ld = -torch.rand(b, h, T, generator=g) * 0.2  # decays exp(-0.2)..1
    return x.to(device), Bm.to(device), Cm.to(device), ld.to(device)


def _check_ssm(b, h, T, dv, r, device, dtype, case, timings=True) -> Row:
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


def smoke_rows(device: torch.device) -> list:
    """Compile and run the scan on a tiny fp32 input (T not a multiple of the chunk)."""
    return [guarded(OP, "tiny", lambda: _check_ssm(1, 2, 150, 32, 8, device, torch.float32, "tiny", timings=False),
                    first_call=True)]


def verify_cases(device: torch.device, quick: bool = False) -> list:
    """bf16 x at a real shape (r = 16) and at an odd length (r = 12)."""
    B, bf16 = (2 if quick else 4), torch.bfloat16
    return [
        lambda: _check_ssm(B, 8, 1024, 256, 16, device, bf16, f"bf16 x ({B},8,1024,256) r=16"),
        lambda: _check_ssm(1, 4, 1000, 64, 12, device, bf16, "bf16 x (1,4,1000,64) r=12, odd T"),
    ]
