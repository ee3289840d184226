"""Triton kernels on a CUDA GPU at real shapes in bf16, against float64 references, with the
numerics gate of design/PERFORMANCE.md (marker ``gpu``; run on the H200 device machine with
``python -m pytest -m gpu tests/gpu``). Kernel modules are imported inside the tests so that
collecting this file never applies ``triton.jit`` before the CPU tests set TRITON_INTERPRET."""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

from phase7fw.kernels.verify import ORDER  # noqa: E402 - imports no kernel module

CASES = list(range(len(ORDER)))  # phase7fw.kernels.verify.verify (15 cases): attention full / window / odd T,
#   distance gate near the boundary, SSM real shape / odd T, then rmsnorm, swiglu,
#   linear cross-entropy, HTT embedding and hyperbolic linear attention (each of those may
#   give several rows), then attention with squared_distance and dot_distance scores, then
#   the SSM at long sequences with batch 1 (every SSM case: a row per schedule), then the
#   SSM's causal convolution


@pytest.mark.parametrize("case", CASES)
def test_kernel_against_fp64_reference(case):
    from phase7fw.kernels.verify import verify

    rows = verify(torch.device("cuda"), quick=True, only=[case])
    assert rows
    for row in rows:
        assert row.ok, f"{row.op} {row.case}: {row.detail} {row.errors}"


def test_smoke_all_kernels():
    from phase7fw.kernels.verify import smoke

    rows = smoke(torch.device("cuda"))
    assert all(r.ok for r in rows), [(r.op, r.detail, r.errors) for r in rows]


@pytest.mark.parametrize("score", ["distance", "dot_distance"])
def test_attention_with_16_bit_gradient_matmuls_passes_the_gate(score):
    """[kernels.hyperbolic_attention] grad_matmul_low_precision = true (the backward's dZ
    matmuls in bf16 instead of TF32): an opt-in speed switch, gated like the default."""
    from phase7fw.kernels.hyperbolic_attention import TritonConfig
    from phase7fw.kernels.hyperbolic_attention.verify import _check_attention

    row = _check_attention(2, 16, 1024, 128, 256, torch.device("cuda"), torch.bfloat16, "bf16 grad matmuls",
                           timings=False, score=score, tuning=TritonConfig(grad_matmul_low_precision=True))
    assert row.ok, f"{row.detail} {row.errors}"
