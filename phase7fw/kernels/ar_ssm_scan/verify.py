"""Parity rows of the AR-SSM scan kernels for ``phase7fw doctor`` and ``doctor --verify``: the
Triton scan under each schedule ("rows", "chunks") and, on a GPU where fla imports, the fla
backend (:mod:`.fla_backend`, rows marked ``[fla]``), one row each, against the chunked
reference in float64 on the same inputs, forward and every gradient (x, B, C, log_decay),
timed side by side and next to the torch reference. Without fla, its rows are left out and
the first row says so."""

from __future__ import annotations

import functools

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


def _implementations(device: torch.device) -> tuple[dict, str | None]:
    """{name: scan} to check on ``device``: the Triton scan under each schedule of
    :data:`SCHEDULES`, and fla's GLA (:mod:`.fla_backend`) on a GPU where fla imports; and a
    note when fla is left out."""
    from phase7fw.kernels._fla import with_fla
    from phase7fw.kernels.ar_ssm_scan.fla_backend import ar_ssm_scan_fla

    return with_fla({schedule: functools.partial(ar_ssm_scan_triton, tuning=TritonConfig(schedule=schedule))
                     for schedule in SCHEDULES}, device, ar_ssm_scan_fla)


def _key(name: str, lead: bool) -> str:
    """The timing key of an implementation's fwd+bwd: ``triton_fwd_bwd`` (the first schedule),
    ``triton_<schedule>_fwd_bwd``, ``fla_fwd_bwd``."""
    if name == "fla":
        return "fla_fwd_bwd"
    return "triton_fwd_bwd" if lead else f"triton_{name}_fwd_bwd"


def _check_ssm(b, h, T, dv, r, device, dtype, case, timings=True, impls=None) -> list[Row]:
    """One row per implementation (``impls``: {name: scan}; default :func:`_implementations`:
    the Triton scan under "rows", then "chunks", then fla's where it runs; later rows' cases
    marked ``[name]``), each against the same float64 reference on the same inputs and output
    gradient, forward and every gradient; one failing implementation never hides another's row.
    Timed (``timings``): each one's fwd+bwd (:func:`_key`) and its ratio to the first row's,
    and in the first row the torch reference's (``reference_fwd_bwd``)."""
    note = None
    if impls is None:
        impls, note = _implementations(device)
    x, Bm, Cm, ld = ssm_inputs(b, h, T, dv, r, device, dtype)
    gy = torch.randn(x.shape, generator=torch.Generator(device="cpu").manual_seed(1)).to(device, dtype)
    ref_ins = [t.detach().double().requires_grad_() for t in (x, Bm, Cm, ld)]
    ref = ar_ssm_scan_reference(*ref_ins)
    ref_grads = torch.autograd.grad(ref, ref_ins, gy.double())
    ref = ref.detach()
    del ref_ins

    def one(scan, row_case, key, lead):
        ins = [t.clone().requires_grad_() for t in (x, Bm, Cm, ld)]
        y = scan(*ins)
        grads = torch.autograd.grad(y, ins, gy)
        errors = {"out": _rel(y, ref)}
        for name, a, bb in zip(("dx", "dB", "dC", "dlog_decay"), grads, ref_grads):
            errors[name] = _rel(a, bb)
        row = gated_row(OP, row_case, errors, (y, *grads))
        del y, grads
        if timings:
            def fwd_bwd():
                o = scan(*ins)
                torch.autograd.grad(o, ins, gy)

            row.ms[key] = _bench(fwd_bwd, device)
            if lead:
                def refr():
                    o = ar_ssm_scan_reference(*ins)
                    torch.autograd.grad(o, ins, gy)

                row.ms["reference_fwd_bwd"] = _bench(refr, device)
        return row

    rows: list[Row] = []
    first = next(iter(impls))
    for name, scan in impls.items():
        lead = not rows
        row_case = case if lead else f"{case} [{name}]"
        key = _key(name, lead)
        row = guarded(OP, row_case, lambda s=scan, c=row_case, k=key, f=lead: one(s, c, k, f))
        if timings and not lead and key in row.ms and _key(first, True) in rows[0].ms:
            row.ms[f"ratio_vs_{first}"] = row.ms[key] / rows[0].ms[_key(first, True)]
        rows.append(row)
    if note:
        rows[0].ms["fla"] = note
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
