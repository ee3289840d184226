"""Int8 weight-only decoding (``phase7fw generate --int8``): the linear layers of the
blocks keep their weights as int8 with one scale per output row, and a decoded token reads
half the weight bytes of bf16. Decoding at batch 1 reads every weight once per token, so its
matmuls are bound by those bytes (benchmarks/RESULTS.md, "the decode step's kernels").

Symmetric per-row quantization: s_r = max_c |W_rc| / 127, Q = round(W / s) in [-127, 127],
so every weight is within s_r / 2 of its original. The layer computes y = (x Q^T) s + b:

* :func:`int8_linear_reference`, torch: dequantize Q to x's dtype and multiply (any shape);
* ``_gemv_kernel``, Triton, for a few rows of x on a GPU (decoding: one row per sequence):
  each program reads a block of Q's rows as int8, converts them in registers and accumulates
  the dot products in fp32; the int8 tensor is never expanded in memory.

Inference only: :func:`quantize_linears` replaces the ``nn.Linear`` modules of the model's
blocks (and the fused input projection of a phase7 block, ``fuse_input_projections``) by
:class:`Int8Linear`; embeddings, norms and the output head stay as they are. Training
through an :class:`Int8Linear` is refused (its weights are buffers, not parameters).
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GEMV_MAX_ROWS", "Int8Linear", "int8_linear", "int8_linear_reference", "quantize_linears", "quantize_rows"]

#: rows of x (tokens decoded at once) up to which the Triton kernel runs; beyond, the reference
GEMV_MAX_ROWS = 8


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q int8 (out, in), scale fp32 (out,)) of ``weight`` (out, in): symmetric per row."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127.0
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def int8_linear_reference(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None):
    """y = (x Q^T) * scale + bias in x's dtype: the torch form (and the kernel's reference)."""
    y = F.linear(x, q.to(x.dtype)) * scale.to(x.dtype)
    return y if bias is None else y + bias.to(x.dtype)


@functools.cache
def _gemv_kernel():
    """The kernel, defined at its first use (importing this module needs no Triton)."""
    from phase7fw.kernels._triton import tl, triton

    @triton.jit
    def _gemv_kernel(X, Q, S, B, Y, N, K, HAS_BIAS: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        # one program: row m of x times rows [n0, n0 + BN) of Q
        m = tl.program_id(1).to(tl.int64)
        offs_n = tl.program_id(0) * BN + tl.arange(0, BN)
        n_ok = offs_n < N
        acc = tl.zeros((BN,), dtype=tl.float32)
        for k0 in range(0, K, BK):
            offs_k = k0 + tl.arange(0, BK)
            k_ok = offs_k < K
            x = tl.load(X + m * K + offs_k, mask=k_ok, other=0.0).to(tl.float32)
            w = tl.load(Q + offs_n[:, None].to(tl.int64) * K + offs_k[None, :], mask=n_ok[:, None] & k_ok[None, :],
                        other=0).to(tl.float32)
            acc += tl.sum(w * x[None, :], 1)
        y = acc * tl.load(S + offs_n, mask=n_ok, other=0.0)
        if HAS_BIAS:
            y += tl.load(B + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        tl.store(Y + m * N + offs_n, y.to(Y.dtype.element_ty), mask=n_ok)

    return _gemv_kernel


def _gemv(x2: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    from phase7fw.kernels._triton import require, triton

    require(x2, q, scale)
    M, K = x2.shape
    N = q.shape[0]
    y = torch.empty(M, N, device=x2.device, dtype=x2.dtype)
    if x2.device.type == "cuda":
        # GEMV is bound by reading Q: keep enough programs in flight to fill the GPU (two per SM
        # where the rows allow), each streaming its rows in 256-wide steps (not tuned on a GPU yet)
        target = 2 * torch.cuda.get_device_properties(x2.device).multi_processor_count
        bn = next((b for b in (64, 32) if triton.cdiv(N, b) * M >= target), 16)
        bk, launch = 256, dict(num_warps=4, num_stages=3)
    else:
        bn, bk, launch = 16, 32, {}
    _gemv_kernel()[(triton.cdiv(N, bn), M)](x2, q, scale, bias if bias is not None else scale, y, N, K,
                                            HAS_BIAS=bias is not None, BN=bn, BK=bk, **launch)
    return y


@torch.library.custom_op("phase7fw::int8_gemv", mutates_args=())
def _int8_gemv(x2: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return _gemv(x2.contiguous(), q, scale, bias)


@_int8_gemv.register_fake
def _(x2, q, scale, bias):
    return x2.new_empty(x2.shape[0], q.shape[0])


def int8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
                kernel: bool = True) -> torch.Tensor:
    """y = (x Q^T) * scale + bias: the Triton kernel where ``kernel`` and x has at most
    :data:`GEMV_MAX_ROWS` rows (decoding), else :func:`int8_linear_reference`."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if not kernel or rows == 0 or rows > GEMV_MAX_ROWS or x.dtype == torch.float64:
        return int8_linear_reference(x, q, scale, bias)
    y = torch.ops.phase7fw.int8_gemv(x.reshape(rows, x.shape[-1]), q, scale, bias)
    return y.reshape(*x.shape[:-1], q.shape[0])


class Int8Linear(nn.Module):
    """An ``nn.Linear`` for decoding with int8 weights and a per-row scale (buffers, saved in
    its state_dict as ``qweight`` and ``scale``). ``kernel``: run the Triton kernel on the GPU
    (or in Triton's interpreter); else the torch reference."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, *, kernel: bool):
        super().__init__()
        q, scale = quantize_rows(weight)
        self.register_buffer("qweight", q)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.in_features, self.out_features, self.kernel = weight.shape[1], weight.shape[0], kernel

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, kernel: bool) -> "Int8Linear":
        return cls(linear.weight, linear.bias, kernel=kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            raise RuntimeError("Int8Linear is for decoding: its int8 weights cannot be trained")
        return int8_linear(x, self.qweight, self.scale, self.bias, self.kernel)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-row scales"


def _use_kernel(device: torch.device) -> bool:
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def quantize_linears(model: nn.Module) -> int:
    """Replace every ``nn.Linear`` inside ``model.blocks`` (and each block's fused input
    projection, where one was fused) by an :class:`Int8Linear`, in place; returns how many
    linear layers were quantized. The model is for inference from then on."""
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise ValueError(f"{type(model).__name__} has no blocks to quantize")
    count = 0
    for block in blocks:
        for name, module in list(block.named_modules()):
            if isinstance(module, nn.Linear):
                parent_name, _, attr = name.rpartition(".")
                parent = block.get_submodule(parent_name) if parent_name else block
                setattr(parent, attr, Int8Linear.from_linear(module, kernel=_use_kernel(module.weight.device)))
                count += 1
        fused = getattr(block, "fused_input", None)
        if fused is not None:
            weight, bias, sizes = fused
            block.fused_input = (Int8Linear(weight, bias, kernel=_use_kernel(weight.device)), None, sizes)
    return count
