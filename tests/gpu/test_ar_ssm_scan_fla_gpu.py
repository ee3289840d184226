"""The fla backend of the AR-SSM scan (``[kernels] ar_ssm_scan = "fla"``: flash-linear-attention's
chunk_simple_gla with query C, key B, value x) on a CUDA GPU (marker ``gpu``; needs ``pip
install fla-core einops``): bf16 x against the float64 chunked reference, forward and every
gradient (x, B, C, log_decay) through the numerics gate of phase7fw.kernels.checks, at the 1.5B
model's shape, an odd length with a rank under 16, and fp32 inputs. Its rows in the
verification table (``[fla]``, phase7fw doctor --verify) time it next to our Triton scan."""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.fixture(scope="module")
def fla_scan():
    pytest.importorskip("fla.ops.simple_gla", reason="fla-core not installed (pip install fla-core einops)")
    from phase7fw.kernels.ar_ssm_scan.fla_backend import ar_ssm_scan_fla

    return ar_ssm_scan_fla


@pytest.mark.parametrize("shape,dtype", [((8, 16, 1024, 128, 16), torch.bfloat16),
                                         ((1, 4, 1000, 64, 12), torch.bfloat16),
                                         ((2, 4, 333, 32, 16), torch.float32)])
def test_fla_scan_against_the_fp64_reference(fla_scan, shape, dtype):
    from phase7fw.kernels.ar_ssm_scan.verify import _check_ssm

    (row,) = _check_ssm(*shape, torch.device("cuda"), dtype, f"{dtype} {shape}", timings=False,
                        impls={"fla": fla_scan})
    _unless_refused(row)
    assert row.ok, f"{row.case}: {row.detail} {row.errors}"


def _unless_refused(row):
    """Where fla refuses the decayed backward on this GPU (Hopper under Triton < 3.7.1), the
    backend must say so in one FlaUnavailable before fla runs; then the parity is skipped."""
    from phase7fw.kernels._fla import gated_backward_refusal

    reason = gated_backward_refusal()
    if reason:
        assert not row.ok and "FlaUnavailable" in row.detail and "cannot train here" in row.detail, row.detail
        pytest.skip(reason)
