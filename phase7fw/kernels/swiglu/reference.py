"""Torch reference of the SwiGLU op (the Triton kernel in :mod:`.kernel` is checked against it)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up: the ``swiglu`` op's torch reference."""
    return F.silu(gate) * up
