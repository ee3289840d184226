"""Torch references of the linear cross-entropy op (the LM head and its loss; the fused Triton
kernel in :mod:`.kernel` is checked against them)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def _ce_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="sum")


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          chunk_tokens: int) -> torch.Tensor:
    """Mean cross-entropy of ``hidden @ weight.T`` against ``targets`` (ignore index -100),
    ``chunk_tokens`` tokens at a time. Each chunk is checkpointed, so neither forward nor
    backward ever holds more than one chunk's logits; backward recomputes them (one extra
    (chunk x d_model x vocab) matmul per chunk)."""
    h, y = hidden.flatten(0, -2), targets.flatten()
    total = h.new_zeros((), dtype=torch.float32)
    for start in range(0, y.numel(), chunk_tokens):
        sl = slice(start, start + chunk_tokens)
        if torch.is_grad_enabled():
            total = total + checkpoint(_ce_sum, h[sl], weight, y[sl], use_reentrant=False)
        else:
            total = total + _ce_sum(h[sl], weight, y[sl])
    return total / (y != -100).sum().clamp(min=1)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk_tokens: int = 0) -> torch.Tensor:
    """Mean cross-entropy of ``hidden @ weight.T`` against ``targets`` (ignore index -100):
    :func:`chunked_cross_entropy` when ``chunk_tokens`` > 0, else the full logits at once."""
    if chunk_tokens:
        return chunked_cross_entropy(hidden, weight, targets, chunk_tokens)
    logits = F.linear(hidden, weight)
    return F.cross_entropy(logits.float().flatten(0, -2), targets.flatten())
