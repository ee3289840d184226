"""HTT (tensor-train) embedding lookup in Triton: fused gather-and-contract, forward and backward.

Same contract as :func:`phase7fw.components.phase7.embedding.htt_embedding_reference`:
``htt_embedding_triton(ids, cores, scale, d_model) -> rows (*ids.shape, d_model)`` with cores
G_k of shape (r_{k-1}, v_k, d_k, r_k), r_0 = r_K = 1, K = 2 or 3 (the factors are read from the
cores' shapes). Row i = scale * (G_1[:, i_1] ... G_K[:, i_K]) flattened over (d_1, .., d_K), first
d_model columns, with i_k the mixed-radix digits of i (most significant first).

One program per token computes its digits, loads the core slices at those digits and
contracts the bonds with tl.dot (all dims padded to powers of two >= 16, masked):

    K = 2:  raw = G_1[0, i_1] (d_1 x r)  @  G_2[:, i_2, :, 0] (r x d_2)
    K = 3:  for each middle digit y:  raw[:, y, :] = (G_1[0, i_1] @ G_2[:, i_2, y, :]) @ G_3[:, i_3, :, 0]

The full table is never built. The backward recomputes the same products per token (cheaper
than saving N x d_model raw rows) and adds the slice gradients into fp32 buffers shaped like
the cores with atomic adds: many tokens share a digit (v_1 ~ sqrt(V)), so the per-token
contributions must be summed, and atomics are the simple correct way to do that without
sorting tokens by digit (torch's index_add_ on the GPU, which the reference's backward uses,
does the same). Sums in fp32 atomics are not bitwise deterministic run to run. dscale is a
per-token partial <dRow, raw> (= <dRow @ G_2^T, G_1> for K = 2: no extra matmul), summed in
torch.

Precision follows the reference's: where its einsum runs in full fp32 (fp32 cores, no autocast,
float32 matmul precision "highest") the dots are fp32 FMA ("ieee", ~1e-7 from fp64); where it
runs at bf16 (autocast, 16-bit cores) or TF32 they use TF32 tensor cores (~8e-4, still finer
than the reference's bf16 rounding, and 3x faster on an H200). Accumulation is always fp32.
The output dtype is the reference's: the cores' dtype promoted with scale's, where under
autocast the cores count as the autocast dtype (einsum autocasts; the fp32 scale then promotes
the rows back to fp32), so bf16 autocast with fp32 cores gives fp32 rows.
"""

from __future__ import annotations

import math

import torch

from phase7fw.kernels._triton import require, tl, triton

__all__ = ["htt_embedding_triton"]


@triton.jit
def _digits(IDS, t, V2, V3, V1):
    # i = (i_1 * v_2 + i_2) * v_3 + i_3 (v_3 = 1 for two cores); floor division as the
    # reference does, for ids in [0, vocab_size)
    tok = tl.load(IDS + t).to(tl.int64)
    i3 = tok % V3
    rest = tok // V3
    return (rest // V2) % V1, rest % V2, i3


@triton.jit
def _htt2_fwd_kernel(
    IDS, G1, G2, SCALE, OUT,
    V1, V2, D1, D2, R, DM,
    BD1: tl.constexpr, BD2: tl.constexpr, BR: tl.constexpr, PREC: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    i1, i2, _ = _digits(IDS, t, V2, 1, V1)
    ox = tl.arange(0, BD1)
    oy = tl.arange(0, BD2)
    oa = tl.arange(0, BR)
    x_ok, y_ok, a_ok = ox < D1, oy < D2, oa < R
    g1 = tl.load(G1 + i1 * D1 * R + ox[:, None] * R + oa[None, :], mask=x_ok[:, None] & a_ok[None, :], other=0.0)
    g2 = tl.load(G2 + oa[:, None] * V2 * D2 + i2 * D2 + oy[None, :], mask=a_ok[:, None] & y_ok[None, :], other=0.0)
    raw = tl.dot(g1.to(tl.float32), g2.to(tl.float32), input_precision=PREC)
    col = ox[:, None] * D2 + oy[None, :]
    keep = x_ok[:, None] & y_ok[None, :] & (col < DM)
    scale = tl.load(SCALE).to(tl.float32)
    tl.store(OUT + t * DM + col, (raw * scale).to(OUT.dtype.element_ty), mask=keep)


@triton.jit
def _htt2_bwd_kernel(
    IDS, G1, G2, SCALE, DOUT, DG1, DG2, DSCALE,
    V1, V2, D1, D2, R, DM,
    BD1: tl.constexpr, BD2: tl.constexpr, BR: tl.constexpr, PREC: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    i1, i2, _ = _digits(IDS, t, V2, 1, V1)
    ox = tl.arange(0, BD1)
    oy = tl.arange(0, BD2)
    oa = tl.arange(0, BR)
    x_ok, y_ok, a_ok = ox < D1, oy < D2, oa < R
    m1 = x_ok[:, None] & a_ok[None, :]
    m2 = a_ok[:, None] & y_ok[None, :]
    p1 = G1 + i1 * D1 * R + ox[:, None] * R + oa[None, :]
    p2 = G2 + oa[:, None] * V2 * D2 + i2 * D2 + oy[None, :]
    g1 = tl.load(p1, mask=m1, other=0.0).to(tl.float32)
    g2 = tl.load(p2, mask=m2, other=0.0).to(tl.float32)
    col = ox[:, None] * D2 + oy[None, :]
    keep = x_ok[:, None] & y_ok[None, :] & (col < DM)
    dout = tl.load(DOUT + t * DM + col, mask=keep, other=0.0).to(tl.float32)
    scale = tl.load(SCALE).to(tl.float32)
    m = tl.dot(dout, tl.trans(g2), input_precision=PREC)  # dL/dG1-slice / scale
    tl.store(DSCALE + t, tl.sum(tl.sum(m * g1, 1), 0))  # <dout, g1 @ g2> = <dout @ g2^T, g1>
    dg2 = tl.dot(tl.trans(g1), dout, input_precision=PREC)
    tl.atomic_add(DG1 + i1 * D1 * R + ox[:, None] * R + oa[None, :], m * scale, mask=m1, sem="relaxed")
    tl.atomic_add(DG2 + oa[:, None] * V2 * D2 + i2 * D2 + oy[None, :], dg2 * scale, mask=m2, sem="relaxed")


@triton.jit
def _htt3_slices(IDS, t, V1, V2, V3, D1, D2, D3, R1, R2,
                 BD1: tl.constexpr, BD3: tl.constexpr, BR1: tl.constexpr, BR2: tl.constexpr):
    """Token t's slices of three cores, shared by the forward and the backward: the output
    offsets (ox, oz) and their masks, and offset and mask of G_1[0, i_1] (d_1 x r_1),
    G_2[:, i_2, 0, :] (r_1 x r_2, step R2 for the next middle column) and G_3[:, i_3, :, 0]
    (r_2 x d_3)."""
    i1, i2, i3 = _digits(IDS, t, V2, V3, V1)
    ox = tl.arange(0, BD1)
    oz = tl.arange(0, BD3)
    oa = tl.arange(0, BR1)
    ob = tl.arange(0, BR2)
    x_ok, z_ok, a_ok, b_ok = ox < D1, oz < D3, oa < R1, ob < R2
    off1 = i1 * D1 * R1 + ox[:, None] * R1 + oa[None, :]
    off2 = oa[:, None] * V2 * D2 * R2 + i2 * D2 * R2 + ob[None, :]
    off3 = ob[:, None] * V3 * D3 + i3 * D3 + oz[None, :]
    m1 = x_ok[:, None] & a_ok[None, :]
    m2 = a_ok[:, None] & b_ok[None, :]
    m3 = b_ok[:, None] & z_ok[None, :]
    return ox, oz, x_ok, z_ok, off1, m1, off2, m2, off3, m3


@triton.jit
def _htt3_fwd_kernel(
    IDS, G1, G2, G3, SCALE, OUT,
    V1, V2, V3, D1, D2, D3, R1, R2, DM,
    BD1: tl.constexpr, BD3: tl.constexpr, BR1: tl.constexpr, BR2: tl.constexpr,
    PREC: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    ox, oz, x_ok, z_ok, off1, m1, off2, m2, off3, m3 = _htt3_slices(
        IDS, t, V1, V2, V3, D1, D2, D3, R1, R2, BD1, BD3, BR1, BR2)
    g1 = tl.load(G1 + off1, mask=m1, other=0.0).to(tl.float32)
    g3 = tl.load(G3 + off3, mask=m3, other=0.0).to(tl.float32)
    scale = tl.load(SCALE).to(tl.float32)
    base2 = G2 + off2
    # the middle digit's columns are strided by d_3: one (d_1 x d_3) slab of the row per y
    for y in range(0, D2):
        g2 = tl.load(base2 + y * R2, mask=m2, other=0.0).to(tl.float32)
        left = tl.dot(g1, g2, input_precision=PREC)
        raw = tl.dot(left, g3, input_precision=PREC)
        col = ox[:, None] * D2 * D3 + y * D3 + oz[None, :]
        keep = x_ok[:, None] & z_ok[None, :] & (col < DM)
        tl.store(OUT + t * DM + col, (raw * scale).to(OUT.dtype.element_ty), mask=keep)


@triton.jit
def _htt3_bwd_kernel(
    IDS, G1, G2, G3, SCALE, DOUT, DG1, DG2, DG3, DSCALE,
    V1, V2, V3, D1, D2, D3, R1, R2, DM,
    BD1: tl.constexpr, BD3: tl.constexpr, BR1: tl.constexpr, BR2: tl.constexpr,
    PREC: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    ox, oz, x_ok, z_ok, off1, m1, off2, m2, off3, m3 = _htt3_slices(
        IDS, t, V1, V2, V3, D1, D2, D3, R1, R2, BD1, BD3, BR1, BR2)
    g1 = tl.load(G1 + off1, mask=m1, other=0.0).to(tl.float32)
    g3 = tl.load(G3 + off3, mask=m3, other=0.0).to(tl.float32)
    scale = tl.load(SCALE).to(tl.float32)
    dg1 = tl.zeros((BD1, BR1), tl.float32)
    dg3 = tl.zeros((BR2, BD3), tl.float32)
    ds = tl.zeros((BD1, BR2), tl.float32)
    for y in range(0, D2):
        g2 = tl.load(G2 + off2 + y * R2, mask=m2, other=0.0).to(tl.float32)
        left = tl.dot(g1, g2, input_precision=PREC)  # (d_1 x r_2): G_1 G_2 at this y
        col = ox[:, None] * D2 * D3 + y * D3 + oz[None, :]
        keep = x_ok[:, None] & z_ok[None, :] & (col < DM)
        dout = tl.load(DOUT + t * DM + col, mask=keep, other=0.0).to(tl.float32)
        dleft = tl.dot(dout, tl.trans(g3), input_precision=PREC)  # / scale
        ds += dleft * left  # <dout, left @ g3> = <dout @ g3^T, left>
        dg3 += tl.dot(tl.trans(left), dout, input_precision=PREC)
        dg1 += tl.dot(dleft, tl.trans(g2), input_precision=PREC)
        dg2 = tl.dot(tl.trans(g1), dleft, input_precision=PREC)
        tl.atomic_add(DG2 + off2 + y * R2, dg2 * scale, mask=m2, sem="relaxed")
    tl.store(DSCALE + t, tl.sum(tl.sum(ds, 1), 0))
    tl.atomic_add(DG1 + off1, dg1 * scale, mask=m1, sem="relaxed")
    tl.atomic_add(DG3 + off3, dg3 * scale, mask=m3, sem="relaxed")


# ---------------------------------------------------------------------------------------


#: (forward, backward) num_warps by (n_cores, tf32): the fastest on an H200 at V=32000, D=2048,
#: r=32, 8192 ids (the 3-core backward loops over d_2 with r x r tiles; fewer warps win there).
WARPS = {(2, False): (4, 2), (2, True): (2, 2), (3, False): (1, 1), (3, True): (1, 1)}


def _cfg(ids: torch.Tensor, n_cores: int, tf32: bool):
    """(dot precision, warps): TF32 only on the GPU (the interpreter computes fp32 anyway)."""
    tf32 = tf32 and ids.device.type == "cuda"
    return ("tf32" if tf32 else "ieee"), WARPS[(n_cores, tf32)]


def _pad(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def _dims(cores):
    """(vocab factors, dim factors, inner ranks) from the cores' shapes."""
    return [c.shape[1] for c in cores], [c.shape[2] for c in cores], [c.shape[-1] for c in cores[:-1]]


def _fwd_impl(ids, cores, scale, d_model, out_dtype, tf32):
    require(ids, scale, *cores)
    n = ids.shape[0]
    out = torch.empty((n, d_model), device=ids.device, dtype=out_dtype)
    if n == 0:
        return out
    v, d, r = _dims(cores)
    prec, (nw, _) = _cfg(ids, len(cores), tf32)
    if len(cores) == 2:
        _htt2_fwd_kernel[(n,)](ids, cores[0], cores[1], scale, out, v[0], v[1], d[0], d[1], r[0], d_model,
                               BD1=_pad(d[0]), BD2=_pad(d[1]), BR=_pad(r[0]), PREC=prec, num_warps=nw)
    else:
        _htt3_fwd_kernel[(n,)](ids, *cores, scale, out, *v, *d, *r, d_model,
                               BD1=_pad(d[0]), BD3=_pad(d[2]), BR1=_pad(r[0]), BR2=_pad(r[1]), PREC=prec, num_warps=nw)
    return out


def _bwd_impl(dout, ids, cores, scale, d_model, tf32):
    require(ids, scale, *cores)
    n = ids.shape[0]
    # fp32 accumulators: bf16 atomics would lose most of the many small contributions
    dcores = [torch.zeros(c.shape, device=c.device, dtype=torch.float32) for c in cores]
    dscale_tok = torch.zeros(n, device=ids.device, dtype=torch.float32)
    if n:
        dout = dout.contiguous()
        v, d, r = _dims(cores)
        prec, (_, nw) = _cfg(ids, len(cores), tf32)
        if len(cores) == 2:
            _htt2_bwd_kernel[(n,)](ids, cores[0], cores[1], scale, dout, *dcores, dscale_tok,
                                   v[0], v[1], d[0], d[1], r[0], d_model,
                                   BD1=_pad(d[0]), BD2=_pad(d[1]), BR=_pad(r[0]), PREC=prec, num_warps=nw)
        else:
            _htt3_bwd_kernel[(n,)](ids, *cores, scale, dout, *dcores, dscale_tok, *v, *d, *r, d_model,
                                   BD1=_pad(d[0]), BD3=_pad(d[2]), BR1=_pad(r[0]), BR2=_pad(r[1]), PREC=prec, num_warps=nw)
    dscale = dscale_tok.sum().reshape(scale.shape)
    return [g.to(c.dtype) for g, c in zip(dcores, cores)] + [dscale.to(scale.dtype)]


@torch.library.custom_op("phase7fw::htt_embedding_fwd", mutates_args=())
def htt_embedding_fwd(ids: torch.Tensor, cores: list[torch.Tensor], scale: torch.Tensor, d_model: int,
                      out_dtype: torch.dtype, tf32: bool) -> torch.Tensor:
    """Kernel core: rows (N, d_model) for flat contiguous ids (N,) and contiguous cores."""
    return _fwd_impl(ids, cores, scale, d_model, out_dtype, tf32)


@htt_embedding_fwd.register_fake
def _(ids, cores, scale, d_model, out_dtype, tf32):
    return ids.new_empty((ids.shape[0], d_model), dtype=out_dtype)


@torch.library.custom_op("phase7fw::htt_embedding_bwd", mutates_args=())
def htt_embedding_bwd(dout: torch.Tensor, ids: torch.Tensor, cores: list[torch.Tensor], scale: torch.Tensor,
                      d_model: int, tf32: bool) -> list[torch.Tensor]:
    """[dG_1, ..., dG_K, dscale], each shaped and typed like its parameter."""
    return _bwd_impl(dout, ids, cores, scale, d_model, tf32)


@htt_embedding_bwd.register_fake
def _(dout, ids, cores, scale, d_model, tf32):
    return [torch.empty_like(c) for c in cores] + [torch.empty_like(scale)]


def _setup_context(ctx, inputs, output):
    ids, cores, scale, d_model, _, tf32 = inputs
    ctx.save_for_backward(ids, scale, *cores)
    ctx.d_model, ctx.tf32 = d_model, tf32


def _backward(ctx, dout):
    ids, scale, *cores = ctx.saved_tensors
    grads = torch.ops.phase7fw.htt_embedding_bwd(dout, ids, cores, scale, ctx.d_model, ctx.tf32)
    return None, grads[:-1], grads[-1], None, None, None


htt_embedding_fwd.register_autograd(_backward, setup_context=_setup_context)


@torch.compiler.assume_constant_result
def _fp32_matmuls_exact() -> bool:
    # torch.compile cannot trace this string-valued query; a compiled step reads it once
    return torch.get_float32_matmul_precision() == "highest"


def _out_dtype_and_tf32(cores, scale) -> tuple[torch.dtype, bool]:
    """The reference's output dtype, and whether the reference's own matmuls are at most TF32
    accurate here (see the module docstring)."""
    dev = scale.device.type
    raw = cores[0].dtype
    for c in cores[1:]:
        raw = torch.promote_types(raw, c.dtype)
    tf32 = raw != torch.float32 or not _fp32_matmuls_exact()
    if torch.is_autocast_enabled(dev):
        raw = torch.get_autocast_dtype(dev)
        tf32 = True
    return torch.promote_types(raw, scale.dtype), tf32


def htt_embedding_triton(ids: torch.Tensor, cores, scale: torch.Tensor, d_model: int) -> torch.Tensor:
    """Drop-in for ``htt_embedding_reference``: rows (*ids.shape, d_model) for ids in
    [0, vocab_size) (not checked: that would sync with the device). Cores may be fp32, bf16
    or fp16 (fp32 accumulation; TF32 dots where the reference is no finer, see the module
    docstring); 2 or 3 cores."""
    cores = list(cores)
    if len(cores) not in (2, 3):
        raise ValueError(f"htt embedding kernel: 2 or 3 cores, got {len(cores)}")
    if cores[0].shape[0] != 1 or cores[-1].shape[-1] != 1 or any(
        a.shape[-1] != b.shape[0] for a, b in zip(cores, cores[1:])
    ):
        raise ValueError(f"htt embedding kernel: cores do not chain: {[tuple(c.shape) for c in cores]}")
    if d_model > math.prod([c.shape[2] for c in cores]):
        raise ValueError(f"htt embedding kernel: d_model {d_model} > product of the cores' column factors")
    if any(t.dtype == torch.float64 for t in (*cores, scale)):
        raise ValueError("the Triton HTT embedding takes fp32/bf16/fp16 cores, not fp64")
    out_dtype, tf32 = _out_dtype_and_tf32(cores, scale)
    # no autocast guard needed: a custom op without an autocast rule sees its inputs as given
    rows = torch.ops.phase7fw.htt_embedding_fwd(ids.reshape(-1).contiguous(), [c.contiguous() for c in cores],
                                                scale.contiguous(), d_model, out_dtype, tf32)
    return rows.reshape(*ids.shape, d_model)
