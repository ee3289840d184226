"""Torch reference of the RMSNorm op (the Triton kernel in :mod:`.kernel` is checked against it)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rmsnorm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) * weight over the last dim, computed in (at least) fp32 (bf16 sums of
    squares lose precision), returned in x's dtype. The ``rmsnorm`` op's torch reference."""
    dt = torch.promote_types(x.dtype, torch.float32)
    return F.rms_norm(x.to(dt), (x.size(-1),), weight.to(dt), eps).to(x.dtype)
