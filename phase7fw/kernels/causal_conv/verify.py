"""Parity rows of the causal convolution kernel for ``phase7fw doctor`` and ``doctor --verify``:
forward and the three gradients against the float64 reference, timed next to the torch
reference (cuDNN's depthwise conv on a GPU)."""

from __future__ import annotations

import torch

from phase7fw.kernels.causal_conv.reference import causal_conv_reference
from phase7fw.kernels.checks import _rel, gated_row, guarded
from phase7fw.kernels.rmsnorm.verify import timed_calls


def causal_conv_triton(*args, **kwargs):
    from phase7fw.kernels.causal_conv.kernel import causal_conv_triton as impl

    return impl(*args, **kwargs)


def _check(b, t, d, K, dtype, device, case, timed, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    u = torch.randn(b, t, d, generator=gen).to(dtype).to(device)
    w = (torch.randn(d, 1, K, generator=gen) / K**0.5).to(device)  # fp32 parameters, as in the model
    bias = torch.randn(d, generator=gen).to(device)
    gy = torch.randn(b, t, d, generator=gen).to(dtype).to(device)
    ins = [x.clone().requires_grad_() for x in (u, w, bias)]

    def run(fn):  # the op on the inputs, the parameters cast to the activations' dtype
        return fn(ins[0], ins[1].to(dtype), ins[2].to(dtype))

    y = run(causal_conv_triton)
    grads = torch.autograd.grad(y, ins, gy)
    ref_ins = [x.double().requires_grad_() for x in (u, w.to(dtype), bias.to(dtype))]
    ref = causal_conv_reference(*ref_ins)
    ref_grads = torch.autograd.grad(ref, ref_ins, gy.double())
    errors = {"out": _rel(y, ref), **{f"d{n}": _rel(a, r) for n, a, r in zip(("u", "weight", "bias"), grads, ref_grads)}}
    row = gated_row("causal_conv", case, errors, (y, *grads))
    if timed:  # timed like the RMSNorm rows
        row.ms.update(timed_calls({name: lambda fn=fn: run(fn) for name, fn in
                                   (("triton", causal_conv_triton), ("reference", causal_conv_reference))},
                                  ins, gy, device))
    return row


def smoke_rows(device: torch.device) -> list:
    """Compile and run forward + backward on a tiny fp32 input (odd sizes)."""
    return [guarded("causal_conv", "tiny", lambda: _check(2, 37, 130, 4, torch.float32, device, "tiny", timed=False),
                    first_call=True)]


def verify_rows(device: torch.device, quick: bool = False) -> list:
    """bf16 at the 1.5B model's shape (and odd sizes) against the fp64 reference, timed."""
    b = 2 if quick else 8
    cases = [((b, 1024, 2048, 4), f"bf16 ({b}, 1024, 2048), K 4"), ((3, 333, 1000, 3), "bf16 (3, 333, 1000), K 3 odd sizes")]
    return [guarded("causal_conv", case, lambda s=s, case=case: _check(*s, torch.bfloat16, device, case, timed=True))
            for s, case in cases]


def verify_cases(device: torch.device, quick: bool = False) -> list:
    """One case (several rows): see :func:`verify_rows`."""
    return [lambda: verify_rows(device, quick)]
