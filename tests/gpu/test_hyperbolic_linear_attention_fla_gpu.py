"""The fla backend of the hyperbolic linear attention (``[kernels] hyperbolic_linear_attention
= "fla"``: flash-linear-attention's chunk_simple_gla on the Lorentz features) on a CUDA GPU
(marker ``gpu``; needs ``pip install fla-core einops``): bf16 inputs against the float64
chunked reference, forward and every gradient (q, k, v, c, decay) through the numerics gate
of phase7fw.kernels.checks, T not a multiple of the chunk, no decay, chunk sizes 16 and 64
(the Phase 8 model with it against the reference model: test_phase8_gpu.py). Its rows in the verification table
(case 10 of test_kernels_gpu.py, ``[fla]``) time it next to our Triton kernel and SDPA."""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

OP = "hyperbolic_linear_attention"


@pytest.fixture(scope="module")
def fla_fn():
    pytest.importorskip("fla.ops.simple_gla", reason="fla-core not installed (pip install fla-core einops)")
    from phase7fw.kernels.hyperbolic_linear_attention.fla_backend import hyperbolic_linear_attention_fla

    return hyperbolic_linear_attention_fla


@pytest.mark.parametrize("shape,chunk", [((2, 4, 1000, 64), 64), ((1, 4, 333, 64), 16), ((1, 16, 1024, 128), 64)])
def test_fla_backend_against_the_fp64_reference(fla_fn, shape, chunk):
    from phase7fw.kernels.hyperbolic_linear_attention.verify import compare

    (row,) = compare(*shape, torch.device("cuda"), torch.bfloat16, f"bf16 {shape}", timed=False, chunk_size=chunk,
                     backends={"fla": fla_fn})
    from phase7fw.kernels._fla import gated_backward_refusal

    if reason := gated_backward_refusal():  # fla refuses the decayed backward here: said before it runs
        assert not row.ok and "cannot train here" in row.detail, row.detail
        pytest.skip(reason)
    assert row.ok, f"{row.case}: {row.detail} {row.errors}"


def test_fla_backend_without_decay_and_in_fp32(fla_fn):
    from phase7fw.kernels.checks import GATE
    from phase7fw.kernels.hyperbolic_linear_attention import hyperbolic_linear_attention_chunked
    from phase7fw.kernels.hyperbolic_linear_attention.verify import inputs

    q, k, v, c, _ = inputs(1, 4, 300, 64, torch.device("cuda"), torch.float32)
    ins = [t.clone().requires_grad_() for t in (q, k, v, c)]
    out = fla_fn(*ins, None)
    assert out.dtype == torch.float32 and out.shape == v.shape
    ref_ins = [t.double().requires_grad_() for t in (q, k, v, c)]
    ref = hyperbolic_linear_attention_chunked(*ref_ins, None)
    gout = torch.randn_like(ref)
    for name, a, b in zip(("out", "dq", "dk", "dv", "dc"), (out, *torch.autograd.grad(out, ins, gout.float())),
                          (ref, *torch.autograd.grad(ref, ref_ins, gout))):
        assert ((a.double() - b).norm() / b.norm()).item() <= GATE, name

