"""Rotary position embedding of the Phase 7 attentions (shared by the training forward, the
cached decode path and the static decode step, which all get bit-identical angles)."""

from __future__ import annotations

import torch
from torch import nn

from phase7fw.errors import Phase7Error


class RotaryEmbedding(nn.Module):
    """Rotate-half RoPE over (B, H, T, D). Tables are non-persistent fp32 buffers for
    ``seq_len`` positions, recomputed by ``init_weights`` (after a meta-device build);
    longer inputs get tables computed on the fly. Output is fp32: the rotation is part of
    the hyperbolic input and must not be rounded to bf16 first."""

    def __init__(self, head_dim: int, seq_len: int, theta: float):
        super().__init__()
        if head_dim % 2:
            raise Phase7Error(f"RoPE needs an even head dimension, got {head_dim}")
        self.head_dim, self.seq_len, self.theta = head_dim, seq_len, theta
        cos, sin = self._tables(seq_len, device=None)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def inv_freq(self, device) -> torch.Tensor:
        half = self.head_dim // 2
        return self.theta ** (-torch.arange(half, dtype=torch.float64, device=device) / half)

    @staticmethod
    def angles(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 (cos, sin) of shape positions.shape + (D/2,), from fp64 products position *
        inv_freq: the tables, the decode caches and the static step get bit-identical angles."""
        ang = positions.to(torch.float64).unsqueeze(-1) * inv_freq
        return ang.cos().float(), ang.sin().float()

    @staticmethod
    def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate-half of x (..., T, D) in fp32 by per-position (cos, sin) of shape (T, D/2)."""
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

    def _tables(self, n: int, device):
        return self.angles(torch.arange(n, device=device), self.inv_freq(device))

    def init_weights(self) -> None:
        cos, sin = self._tables(self.seq_len, device=self.cos.device)
        with torch.no_grad():
            self.cos.copy_(cos)
            self.sin.copy_(sin)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T = x.shape[-2]
        if T <= self.cos.shape[0]:
            cos, sin = self.cos[:T].float(), self.sin[:T].float()
        else:
            cos, sin = self._tables(T, device=x.device)
        return self.rotate(x, cos, sin)
