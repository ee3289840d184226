"""Triton helpers shared by the chunked scans (``ar_ssm_scan``, ``hyperbolic_linear_attention``).

Both read (b*h, T, width) tensors chunk by chunk and weigh token pairs by the in-chunk decay.
Two schedules use them: one program per (batch x head, value tile) walking the chunks in
order (:func:`program_tiles`; ``ar_ssm_scan``'s "rows" schedule), or chunk-parallel
(:func:`chunk_tiles`; ``hyperbolic_linear_attention``, ``ar_ssm_scan``'s "chunks" schedule):
one program per chunk writes the chunk's own contribution to the state (and, with
:func:`store_total`, its total log-decay), :func:`chunk_scan` turns those, in place, into the
state entering each chunk (or, in reverse, dL/d(the state leaving it)), and one program per
chunk computes the chunk's outputs from it. The helpers below say that once (``@triton.jit``
functions are inlined into the kernels).
"""

from __future__ import annotations

from phase7fw.kernels._triton import tl, triton

#: chunks per step of the inter-chunk scan (:func:`chunk_scan`): their loads are issued
#: together (one memory latency per CH chunks, not per chunk) and combined by a CH x CH
#: matrix (tl.dot needs >= 16)
SCAN_CHUNKS = 16


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


@triton.jit
def store_total(TOT, row, total, offs, first):
    """The chunk's total log-decay into TOT[row] (a (b*h, n) fp32 tensor, row = bh * n + c),
    stored by one lane of the programs where ``first`` holds (a vector mask over ``offs``, e.g.
    value tile 0: a scalar condition in a mask is not supported everywhere)."""
    tl.store(TOT + row + offs * 0, total + offs * 0.0, mask=(offs == 0) & first)


@triton.jit
def _scan_rows(P, TOT, bh, NCHUNK, E, offs_e, REVERSE: tl.constexpr, CH: tl.constexpr):
    """Turn the chunks' own contributions X_c (rows of E elements at P + (bh * n + c) * E; this
    program's columns ``offs_e``), in place, into the running sum entering each chunk in walking
    order (c = 0, 1, ... or, with REVERSE, n-1, n-2, ...): R = 0 at the first, then
    R <- exp(g_c) R + X_c (g: the chunk totals in TOT). CH chunks per step, loaded together:
    with R_0 entering the step, R_j = exp(sum_{l<j} g_l) R_0 + sum_{i<j} exp(sum_{i<l<j} g_l) X_i.
    Every exponent is a sum of log-decays (<= 0), never a difference of two sums (a
    difference of long sums would lose the short one's digits)."""
    e_ok = offs_e < E
    j = tl.arange(0, CH)
    lower = j[:, None] > j[None, :]  # [j, i]: i < j
    last = j == CH - 1
    run = offs_e * 0.0  # R entering the step
    for step in range(0, tl.cdiv(NCHUNK, CH)):
        k = step * CH + j
        k_ok = k < NCHUNK
        if REVERSE:
            c = NCHUNK - 1 - k
            c_prev = c + 1
        else:
            c = k
            c_prev = c - 1
        g = tl.load(TOT + bh * NCHUNK + c, mask=k_ok, other=0.0)
        # gs_j = g_{j-1} (0 for j = 0): loaded one chunk back rather than shifted in registers
        gs = tl.load(TOT + bh * NCHUNK + c_prev, mask=k_ok & (j > 0), other=0.0)
        ptrs = P + (bh * NCHUNK + c)[:, None] * E + offs_e[None, :]
        mask = k_ok[:, None] & e_ok[None, :]
        x = tl.load(ptrs, mask=mask, other=0.0)
        # [j, i]: the running sum over rows l of gs_l for l > i + 1, i.e. sum_{i<l<j} g_l
        seg = tl.cumsum(tl.where(j[:, None] > j[None, :] + 1, gs[:, None], 0.0), 0)
        m = tl.where(lower, tl.exp(seg), 0.0)
        r = tl.exp(tl.cumsum(gs, 0))[:, None] * run[None, :] + tl.dot(m, x, input_precision="ieee")
        tl.store(ptrs, r, mask=mask)
        # the step's last chunk, one plain recurrence step: the sum entering the next step
        g_last = tl.sum(tl.where(last, g, 0.0), 0)
        run = tl.exp(g_last) * tl.sum(tl.where(last[:, None], r, 0.0), 0) + tl.sum(tl.where(last[:, None], x, 0.0), 0)


@triton.jit
def _chunk_scan_kernel(P1, P2, TOT, NCHUNK, E1, E2, TILES1,
                       BLOCK: tl.constexpr, CH: tl.constexpr, REVERSE: tl.constexpr):
    # programs (column tile, b*h): the first TILES1 tiles cover a chunk's E1 elements of the
    # first buffer, the rest the E2 of the second (none where E2 = 0)
    pid = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)  # int64: (bh * n + c) * E overflows int32 on long runs
    offs = tl.arange(0, BLOCK)
    if pid < TILES1:
        _scan_rows(P1, TOT, bh, NCHUNK, E1, pid * BLOCK + offs, REVERSE, CH)
    else:
        _scan_rows(P2, TOT, bh, NCHUNK, E2, (pid - TILES1) * BLOCK + offs, REVERSE, CH)


def chunk_scan(totals, buffers, launch, reverse: bool) -> None:
    """The inter-chunk scan, in place: each of ``buffers`` (one or two contiguous fp32 tensors
    whose first dimensions are (b, h, n chunks), any per-chunk shape after them) holds every
    chunk's own contribution X_c and becomes the running sum entering each chunk in walking
    order, R <- exp(totals[bh, c]) R + X_c from R = 0, forward (c = 0, 1, ...: the state entering
    chunk c) or ``reverse`` (dL/d(the state leaving chunk c)). ``totals``: (b*h, n) fp32 chunk
    log-decays (<= 0). ``launch``: (elements per program, num_warps, num_stages); memory-bound,
    fp32 FMA, each program walks the n chunks of its slice of one (batch x head) row,
    :data:`SCAN_CHUNKS` chunks per step."""
    assert 1 <= len(buffers) <= 2, "chunk_scan scans one or two buffers"
    block, nw, ns = launch
    BH, n = totals.shape
    if n == 0 or BH == 0:
        return
    per_chunk = [buf.numel() // (BH * n) for buf in buffers]  # elements of one chunk
    e1, e2 = per_chunk[0], sum(per_chunk[1:])
    tiles1 = triton.cdiv(e1, block)
    _chunk_scan_kernel[(tiles1 + triton.cdiv(e2, block), BH)](
        buffers[0], buffers[-1], totals, n, e1, e2, tiles1, BLOCK=block, CH=SCAN_CHUNKS, REVERSE=reverse,
        num_warps=nw, num_stages=ns)
