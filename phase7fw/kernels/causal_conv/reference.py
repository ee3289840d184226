"""Torch reference of the causal depthwise convolution (the Triton kernel in :mod:`.kernel` is
checked against it)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_conv_reference(u: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Depthwise convolution over time of u (b, t, d) with K-1 zeros on the left only:
    ``out[:, t, c] = bias[c] + sum_k weight[c, 0, k] * u[:, t - K + 1 + k, c]`` (weight (d, 1, K)),
    so out_t reads u_{t-K+1..t}. ``F.conv1d`` on the transposed input (cuDNN on a GPU)."""
    K = weight.shape[-1]
    u = F.pad(u.transpose(1, 2), (K - 1, 0))
    return F.conv1d(u, weight, bias, groups=weight.shape[0]).transpose(1, 2)
