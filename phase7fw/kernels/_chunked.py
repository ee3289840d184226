"""Triton helpers shared by the chunked scans (``ar_ssm_scan``, ``hyperbolic_linear_attention``).

Both read (b*h, T, width) tensors chunk by chunk and weigh token pairs by the in-chunk decay:
``ar_ssm_scan`` walks the chunks of one (batch x head) row with one program per value tile
(:func:`program_tiles`), ``hyperbolic_linear_attention`` runs one program per chunk and value
tile (:func:`chunk_tiles`); the helpers below say that once (``@triton.jit`` functions are
inlined into the kernels).
"""

from __future__ import annotations

from phase7fw.kernels._triton import tl, triton


@triton.jit
def _tile_offsets(pid_v, Q: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, K, DV):
    offs_q = tl.arange(0, Q)
    offs_k = tl.arange(0, BK)
    offs_v = pid_v * BV + tl.arange(0, BV)
    return offs_q, offs_k, offs_v, offs_k < K, offs_v < DV


@triton.jit
def program_tiles(Q: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, K, DV):
    """This program's value tile and (batch x head) row, and the offsets and in-range masks of
    a chunk's tokens, the key width K (padded to BK) and the value tile (BV of DV)."""
    pid_v = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)  # int64: bh * T * width overflows int32 on long runs
    offs_q, offs_k, offs_v, k_ok, v_ok = _tile_offsets(pid_v, Q, BK, BV, K, DV)
    return pid_v, bh, offs_q, offs_k, offs_v, k_ok, v_ok


@triton.jit
def chunk_tiles(Q: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, K, DV, T):
    """:func:`program_tiles` for chunk-parallel kernels (one program per chunk, value tile and
    (batch x head) row; grid (chunks x value tiles, b*h), the tiles of one chunk adjacent so
    they read its keys and queries from L2): also this program's chunk c, its tokens t and
    their in-range mask."""
    n_v = tl.cdiv(DV, BV)
    c = tl.program_id(0) // n_v
    pid_v = tl.program_id(0) % n_v
    bh = tl.program_id(1).to(tl.int64)
    offs_q, offs_k, offs_v, k_ok, v_ok = _tile_offsets(pid_v, Q, BK, BV, K, DV)
    t = c * Q + offs_q
    return c, pid_v, bh, offs_q, t, offs_k, offs_v, t < T, k_ok, v_ok


@triton.jit
def row_ptrs(base, bh, t, cols, T, width):
    """Pointers to tokens ``t`` x columns ``cols`` of row ``bh`` of a contiguous (b*h, T, width) tensor."""
    return base + bh * T * width + t[:, None] * width + cols[None, :]


@triton.jit
def load_rows(base, bh, t, cols, T, width, mask):
    """The (tokens x columns) tile at :func:`row_ptrs`, in fp32, 0 where masked."""
    return tl.load(row_ptrs(base, bh, t, cols, T, width), mask=mask, other=0.0).to(tl.float32)


@triton.jit
def chunk_log_decay(LD, bh, t, t_ok, T):
    """The running log-decay within the chunk (cum) and the chunk's total, from a (b*h, T) tensor."""
    ld = tl.load(LD + bh * T + t, mask=t_ok, other=0.0).to(tl.float32)
    return tl.cumsum(ld, 0), tl.sum(ld, 0)


@triton.jit
def causal_decay(cum, causal):
    """L_ij = exp(cum_i - cum_j) where ``causal`` (i >= j), else 0 (exp(-inf): no overflow)."""
    return tl.exp(tl.where(causal, cum[:, None] - cum[None, :], float("-inf")))
