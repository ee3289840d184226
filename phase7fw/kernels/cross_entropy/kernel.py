"""Fused chunked linear cross-entropy: the LM head and its loss without the full logits.

Same contract as :func:`.reference.linear_cross_entropy`:
``linear_cross_entropy_triton(hidden, weight, targets, chunk_tokens) -> loss``, the mean
cross-entropy of ``hidden @ weight.T`` (hidden (..., D), weight (V, D)) against ``targets``
(...,), ignore index -100, mean over the non-ignored targets (0 when all are ignored).

The gradients are made in the forward, chunk by chunk, so the logits never exist whole and
are never recomputed. Per chunk of C tokens:

    logits = h_c @ W^T                      cuBLAS, in the compute dtype (bf16 under autocast)
    kernel, per row: online max / sum-exp over the vocab in fp32 -> row loss = lse - logit[y],
            and the logits buffer overwritten in place with softmax - onehot(y) (0 if y = -100)
    dh_c   = dlogits @ W                    -> grad_h rows (hidden's dtype)
    dW    += dlogits^T @ h_c                fp32 accumulator

and at the end both are multiplied by 1 / n_valid (done after the matmuls, not in the kernel,
so a 16-bit dlogits holds p - onehot rather than a value 1 / n_valid smaller: no fp16
underflow). The backward only multiplies the stored grad_h and dW by the incoming gradient.

Memory beyond the inputs: one chunk of logits (C x V, compute dtype), grad_h (N x D, hidden's
dtype), dW (V x D, fp32), a compute-dtype copy of W when autocast casts it, and N fp32 row
losses. The torch reference (checkpointed chunks) holds about C x V x 10 bytes in backward
(bf16 logits, their fp32 copy and fp32 gradient) and runs one more V x D x C matmul per chunk
(the recomputed logits); without chunking it holds N x V x ~12 bytes.

``chunk_tokens = 0`` picks :func:`default_chunk_tokens`: the largest multiple of 256 tokens whose
logits fit in ``[kernels.cross_entropy] chunk_mib`` (:class:`TritonConfig`; 256 MiB by default),
at least 256: 4096 tokens at V = 32000 in bf16, 1024 at V = 128256.

Targets must be in [0, V) or -100; any other value is not checked on the host (that would
synchronize) but gives a NaN row loss, so the step is reported non-finite.
"""

from __future__ import annotations

import torch

from phase7fw.kernels._triton import require, tl, triton
from phase7fw.kernels.cross_entropy import TritonConfig

__all__ = ["DEFAULT_CHUNK_BYTES", "default_chunk_tokens", "linear_cross_entropy_triton"]

IGNORE_INDEX = -100

#: logits bytes of one chunk when ``chunk_tokens`` is 0 and no tuning is given
DEFAULT_CHUNK_BYTES = TritonConfig().chunk_mib * 2**20


@triton.jit
def _ce_rows_kernel(LOGITS, TARGETS, LOSS, N, V, stride,
                    WRITE_GRAD: tl.constexpr, ROWS: tl.constexpr, BLOCK_V: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < N
    # rows past N read row N-1 (real memory, finite statistics) and store nothing
    ptr = LOGITS + tl.minimum(rows, N - 1).to(tl.int64)[:, None] * stride
    tgt = tl.load(TARGETS + tl.minimum(rows, N - 1))
    offs = tl.arange(0, BLOCK_V)
    # pass 1: running max m and sum s of exp(x - m) over vocab blocks, fp32; the target's logit
    m = tl.full((ROWS,), float("-inf"), tl.float32)
    s = tl.zeros((ROWS,), tl.float32)
    x_t = tl.zeros((ROWS,), tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        x = tl.load(ptr + cols[None, :], mask=(cols < V)[None, :], other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, 1))  # finite: every block has a column < V
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new[:, None]), 1)
        m = m_new
        x_t += tl.sum(tl.where(cols[None, :] == tgt[:, None], x, 0.0), 1)
    ignored = tgt == -100
    valid = (tgt >= 0) & (tgt < V)
    loss = tl.where(valid, m + tl.log(s) - x_t, float("nan"))
    tl.store(LOSS + rows, tl.where(ignored, 0.0, loss), mask=row_ok)
    if WRITE_GRAD:
        # pass 2 (the rows are still in L2): d(row loss)/d(logits) = softmax - onehot, in place
        inv_s = tl.where(ignored, 0.0, 1.0 / s)  # ignored rows: zero gradient
        keep = tl.where(ignored, 0.0, 1.0)
        for start in range(0, V, BLOCK_V):
            cols = start + offs
            mask = row_ok[:, None] & (cols < V)[None, :]
            x = tl.load(ptr + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            g = tl.exp(x - m[:, None]) * inv_s[:, None] - tl.where(cols[None, :] == tgt[:, None], keep[:, None], 0.0)
            tl.store(ptr + cols[None, :], g.to(LOGITS.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------


def default_chunk_tokens(vocab: int, itemsize: int, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Tokens per chunk when ``chunk_tokens`` is 0: logits of at most ``chunk_bytes``,
    a multiple of 256 (full matmul tiles), at least 256."""
    return max(256, chunk_bytes // (vocab * itemsize) // 256 * 256)


def _launch_cfg(logits: torch.Tensor, V: int):
    """(rows per program, vocab block, warps)."""
    if logits.device.type == "cuda":
        # memory-bound: one row per program, wide blocks (16 elements per thread at 8 warps)
        return 1, min(4096, triton.next_power_of_2(V)), 8
    # interpreter: its cost is per program and per op, so many rows per program; small vocab
    # blocks still exercise the multi-block loop
    return 16, min(64, triton.next_power_of_2(V)), 4


def _addmm_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b with acc fp32 and a, b possibly 16-bit."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif acc.is_cuda:
        # cuBLAS accumulates in fp32 and writes fp32: no rounding of the chunk's product to
        # 16 bits and no (V x D) temporary
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    else:
        acc.add_(torch.mm(a, b))


def _fwd_impl(hidden, weight, targets, chunk_tokens, compute_dtype, need_dh, need_dw):
    require(hidden, weight, targets)
    N, D = hidden.shape
    V = weight.shape[0]
    cdt = compute_dtype
    C = chunk_tokens or default_chunk_tokens(V, torch.empty((), dtype=cdt).element_size())
    C = max(1, min(C, N))
    w = weight.to(cdt)  # a copy only when autocast casts it (what F.linear would do too)
    y = targets.contiguous()
    row_loss = torch.empty(N, device=hidden.device, dtype=torch.float32)
    grad_h = hidden.new_empty((N, D)) if need_dh else hidden.new_empty((0,))
    grad_w = (torch.zeros((V, D), device=weight.device, dtype=torch.float32) if need_dw
              else weight.new_empty((0,), dtype=torch.float32))
    write_grad = need_dh or need_dw
    buf = torch.empty((C, V), device=hidden.device, dtype=cdt) if N else None
    for start in range(0, N, C):
        c = min(C, N - start)
        h = hidden[start:start + c].to(cdt)
        logits = torch.mm(h, w.t(), out=buf[:c])
        R, BLOCK_V, nw = _launch_cfg(logits, V)
        _ce_rows_kernel[(triton.cdiv(c, R),)](logits, y[start:start + c], row_loss[start:start + c], c, V, logits.stride(0),
                                              WRITE_GRAD=write_grad, ROWS=R, BLOCK_V=BLOCK_V, num_warps=nw)
        if need_dh:
            grad_h[start:start + c].copy_(torch.mm(logits, w))
        if need_dw:
            _addmm_fp32(grad_w, logits.t(), h)
    n_valid = (y != IGNORE_INDEX).sum().clamp(min=1)
    loss = row_loss.sum() / n_valid
    inv = 1.0 / n_valid.to(torch.float32)  # a device tensor: no host synchronization
    if need_dh:
        grad_h.mul_(inv)
    if need_dw:
        grad_w.mul_(inv)
    return loss, grad_h, grad_w


@torch.library.custom_op("phase7fw::linear_cross_entropy_fwd", mutates_args=())
def linear_cross_entropy_fwd(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                             chunk_tokens: int, compute_dtype: torch.dtype, need_dh: bool, need_dw: bool
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean loss fp32, dloss/dhidden (N, D) or empty, dloss/dweight (V, D) fp32 or empty)."""
    return _fwd_impl(hidden, weight, targets, chunk_tokens, compute_dtype, need_dh, need_dw)


@linear_cross_entropy_fwd.register_fake
def _(hidden, weight, targets, chunk_tokens, compute_dtype, need_dh, need_dw):
    N, D = hidden.shape
    grad_h = hidden.new_empty((N, D)) if need_dh else hidden.new_empty((0,))
    grad_w = weight.new_empty(tuple(weight.shape) if need_dw else (0,), dtype=torch.float32)
    return hidden.new_empty((), dtype=torch.float32), grad_h, grad_w


def _setup_context(ctx, inputs, output):
    hidden, weight, _, _, _, need_dh, need_dw = inputs
    ctx.need = (need_dh, need_dw)
    ctx.weight_dtype = weight.dtype
    ctx.save_for_backward(output[1], output[2])


def _backward(ctx, dloss, _dgrad_h, _dgrad_w):
    grad_h, grad_w = ctx.saved_tensors
    need_dh, need_dw = ctx.need
    dh = grad_h * dloss.to(grad_h.dtype) if need_dh else None
    dw = None
    if need_dw:  # multiplied in fp32, written in the weight's dtype: no (V, D) fp32 temporary
        dw = torch.mul(grad_w, dloss, out=grad_w.new_empty(grad_w.shape, dtype=ctx.weight_dtype))
    return dh, dw, None, None, None, None, None


linear_cross_entropy_fwd.register_autograd(_backward, setup_context=_setup_context)


def linear_cross_entropy_triton(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                chunk_tokens: int, *, tuning: TritonConfig | None = None) -> torch.Tensor:
    """Drop-in for :func:`phase7fw.core.memory.chunked_cross_entropy` (0-dim fp32 result).

    ``chunk_tokens = 0`` picks :func:`default_chunk_tokens`. Under autocast the matmuls run in
    the autocast dtype (as F.linear would); the softmax statistics are fp32. Gradients are
    computed in the forward only for the inputs that need them (``weight.requires_grad``,
    ``hidden.requires_grad``, grad mode on); under ``torch.no_grad`` only the loss."""
    D = hidden.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != D:
        raise ValueError(f"linear cross-entropy: weight must be (vocab, {D}), got {tuple(weight.shape)}")
    h, y = hidden.reshape(-1, D), targets.reshape(-1)
    if y.numel() != h.shape[0]:
        raise ValueError(f"linear cross-entropy: {h.shape[0]} hidden rows but {y.numel()} targets")
    if chunk_tokens < 0:
        raise ValueError(f"linear cross-entropy: chunk_tokens must be >= 0, got {chunk_tokens}")
    dev = h.device.type
    if torch.is_autocast_enabled(dev):
        cdt = torch.get_autocast_dtype(dev)
    else:
        cdt = torch.promote_types(h.dtype, weight.dtype)
    if cdt == torch.float64:
        raise ValueError("the Triton linear cross-entropy takes fp32/bf16/fp16 inputs, not fp64")
    if not chunk_tokens:  # the chunk of [kernels.cross_entropy] chunk_mib
        chunk_bytes = (tuning or TritonConfig()).chunk_mib * 2**20
        chunk_tokens = default_chunk_tokens(weight.shape[0], torch.empty((), dtype=cdt).element_size(), chunk_bytes)
    grad = torch.is_grad_enabled()
    with torch.autocast(device_type=dev, enabled=False):
        loss, _, _ = torch.ops.phase7fw.linear_cross_entropy_fwd(
            h, weight, y, int(chunk_tokens), cdt, grad and h.requires_grad, grad and weight.requires_grad)
    return loss
