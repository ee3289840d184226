"""Parity rows of the AR-SSM scan kernel for ``phase7fw doctor`` and ``doctor --verify``: the
Triton scan under each schedule ("rows", "chunks"), one row each, against the chunked
reference in float64 on the same inputs, forward and every gradient (x, B, C, log_decay),
timed side by side and next to the torch reference."""

from __future__ import annotations

import torch

from phase7fw.kernels.ar_ssm_scan import SCHEDULES, TritonConfig
from phase7fw.kernels.ar_ssm_scan.reference import ar_ssm_scan_reference
from phase7fw.kernels.checks import Row, _bench, _collect, _rel, gated_row, guarded

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


def _check_ssm(b, h, T, dv, r, device, dtype, case, timings=True) -> list[Row]:
    """One row per schedule of ``[kernels.ar_ssm_scan]`` (:data:`SCHEDULES`: "rows", then
    "chunks", case marked ``[chunks]``), each against the same float64 reference on the same
    inputs and output gradient, forward and every gradient; one failing schedule never hides
    the other's row. Timed (``timings``): each schedule's fwd+bwd (``triton_fwd_bwd``,
    ``triton_chunks_fwd_bwd`` and its ratio to the first row's), and in the first row the torch
    reference's (``reference_fwd_bwd``)."""
    x, Bm, Cm, ld = ssm_inputs(b, h, T, dv, r, device, dtype)
    gy = torch.randn(x.shape, generator=torch.Generator(device="cpu").manual_seed(1)).to(device, dtype)
    ref_ins = [t.detach().double().requires_grad_() for t in (x, Bm, Cm, ld)]
    ref = ar_ssm_scan_reference(*ref_ins)
    ref_grads = torch.autograd.grad(ref, ref_ins, gy.double())
    ref = ref.detach()
    del ref_ins

    def one(schedule, row_case, key, lead):
        tuning = TritonConfig(schedule=schedule)
        ins = [t.clone().requires_grad_() for t in (x, Bm, Cm, ld)]
        y = ar_ssm_scan_triton(*ins, tuning=tuning)
        grads = torch.autograd.grad(y, ins, gy)
        errors = {"out": _rel(y, ref)}
        for name, a, bb in zip(("dx", "dB", "dC", "dlog_decay"), grads, ref_grads):
            errors[name] = _rel(a, bb)
        row = gated_row(OP, row_case, errors, (y, *grads))
        del y, grads
        if timings:
            def tri():
                o = ar_ssm_scan_triton(*ins, tuning=tuning)
                torch.autograd.grad(o, ins, gy)

            row.ms[key] = _bench(tri, device)
            if lead:
                def refr():
                    o = ar_ssm_scan_reference(*ins)
                    torch.autograd.grad(o, ins, gy)

                row.ms["reference_fwd_bwd"] = _bench(refr, device)
        return row

    rows: list[Row] = []
    for schedule in SCHEDULES:
        lead = not rows
        row_case = case if lead else f"{case} [{schedule}]"
        key = "triton_fwd_bwd" if lead else f"triton_{schedule}_fwd_bwd"
        row = guarded(OP, row_case, lambda s=schedule, c=row_case, k=key, f=lead: one(s, c, k, f))
        if timings and not lead and key in row.ms and "triton_fwd_bwd" in rows[0].ms:
            row.ms[f"ratio_vs_{SCHEDULES[0]}"] = row.ms[key] / rows[0].ms["triton_fwd_bwd"]
        rows.append(row)
    return rows


def smoke_rows(device: torch.device) -> list:
    """Compile and run the scan on a tiny fp32 input (T not a multiple of the chunk), both schedules."""
    return _collect(OP, "tiny", lambda: _check_ssm(1, 2, 150, 32, 8, device, torch.float32, "tiny", timings=False),
                    first_call=True)


def verify_cases(device: torch.device, quick: bool = False) -> list:
    """bf16 x at a real shape (r = 16), at an odd length (r = 12), and at long sequences with
    batch 1 (where the "rows" schedule has few programs): phase7_small's SSM heads (8 x 32) at
    T = 32k and the 1.5B model's (8 x 256) at 16k. Each case: a row per schedule."""
    B, bf16 = (2 if quick else 4), torch.bfloat16
    return [
        lambda: _check_ssm(B, 8, 1024, 256, 16, device, bf16, f"bf16 x ({B},8,1024,256) r=16"),
        lambda: _check_ssm(1, 4, 1000, 64, 12, device, bf16, "bf16 x (1,4,1000,64) r=12, odd T"),
        lambda: (_check_ssm(1, 8, 32768, 32, 16, device, bf16, "bf16 x (1,8,32768,32) r=16")
                 + _check_ssm(1, 8, 16384, 256, 16, device, bf16, "bf16 x (1,8,16384,256) r=16")),
    ]
