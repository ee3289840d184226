"""Cached decoding for the Phase 7 mixers (see :mod:`phase7fw.inference.decoding` for the protocol).

The modules' ``forward_cached`` methods are thin and call these functions, so the training
forward stays untouched. Every function takes the module itself and reuses its parameters,
projections and (for prefill) its parallel implementation -- ``attention_fn`` and
``scan_impl``, which kernel selection may have swapped for Triton kernels.

Hyperbolic attention: the ring buffer keeps the last W post-RoPE keys (fp32, as RoPE returns
them) and values; a new query scores the cached keys with the same distance chain as the
reference (:func:`geometry.dist_from_tangent_stats`, fp32).

AR-SSM: the cache keeps the last K-1 mixer inputs (the causal conv's left context) and the
state S (b, H, r, dv) in fp32. A decoded token is one recurrence step. A prompt runs the
parallel scan from a zero state and the entering state is added in closed form:

    y_i += exp(cum_i) C_i^T S_in,    S_out = exp(cum_T) S_in + sum_j exp(cum_T - cum_j) B_j x_j^T

with cum the running sum of log-decays; cum_T - cum_j is summed from the end (a suffix sum),
so it stays accurate on long prompts (no difference of two large numbers).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from phase7fw.components.caches import KVWindow, cached_window_attention, dot_product_scores
from phase7fw.kernels.hyperbolic_attention import distance_scores, geometry


# ----------------------------------------------------------------------------- attention
def rope_at(rope, x: torch.Tensor, start: int) -> torch.Tensor:
    """``rope(x)`` for positions start..start+T-1 (bit-identical angles to the tables: the
    same fp64 products position * inv_freq)."""
    T = x.shape[-2]
    if start + T <= rope.cos.shape[0]:
        cos, sin = rope.cos[start : start + T].float(), rope.sin[start : start + T].float()
    else:
        cos, sin = rope.angles(torch.arange(start, start + T, device=x.device), rope.inv_freq(x.device))
    return rope.rotate(x, cos, sin)


def qkv_at(attn, u: torch.Tensor, start: int):
    """The module's q, k (rotated at absolute positions), v for the new tokens u (B, T, D)."""
    q, k, v = attn.projected(u)
    return rope_at(attn.rope, q, start), rope_at(attn.rope, k, start), v


def hyperbolic_scores(q: torch.Tensor, k: torch.Tensor, c: torch.Tensor, tau: torch.Tensor,
                      score: str = "distance") -> torch.Tensor:
    """The hyperbolic attention scores (``score``: see :func:`phase7fw.kernels.hyperbolic_attention.distance_scores`) for
    (B, H, Tq, D) x (B, H, L, D) -> (B, H, Tq, L)."""
    H = q.shape[1]
    dt = torch.float64 if torch.float64 in (q.dtype, k.dtype) else torch.float32
    with torch.autocast(q.device.type, enabled=False):
        q, k = q.to(dt), k.to(dt)
        c = c.to(dt).expand(H) if c.dim() == 0 else c.to(dt)
        tau = tau.to(dt).expand(H) if tau.dim() == 0 else tau.to(dt)
        sq = geometry.tangent_stats(q, c.view(H, 1))
        sk = geometry.tangent_stats(k, c.view(H, 1))
        sq = geometry.TangentStats(*(s.unsqueeze(-1) for s in sq))
        sk = geometry.TangentStats(*(s.unsqueeze(-2) for s in sk))
        dot = q @ k.transpose(-1, -2)
        d = geometry.dist_from_tangent_stats(dot, sq, sk, c.view(H, 1, 1))
        return distance_scores(d, tau.view(H, 1, 1), score, dot * q.shape[-1] ** -0.5)


def hyperbolic_forward_cached(attn, u: torch.Tensor, kv: KVWindow, start: int) -> torch.Tensor:
    q, k, v = qkv_at(attn, u, start)
    c, tau = attn.curvature(), attn.temperature()
    o = cached_window_attention(
        q, k, v, kv, attn.window,
        scores=lambda qb, keys: hyperbolic_scores(qb, keys, c, tau, attn.score),
        prefill=lambda q_, k_, v_: attn.attention_fn(q_, k_, v_, c, tau, attn.window, score=attn.score),
    )
    return attn._out(o)


def sdpa_forward_cached(attn, u: torch.Tensor, kv: KVWindow, start: int) -> torch.Tensor:
    q, k, v = qkv_at(attn, u, start)
    q, k = q.to(v.dtype), k.to(v.dtype)  # as in SdpaAttention.forward
    window = attn.window or None

    def prefill(q_, k_, v_):  # the module's own parallel path on the prompt
        T = q_.shape[-2]
        if window is None or window >= T:
            return F.scaled_dot_product_attention(q_, k_, v_, is_causal=True)
        pos = torch.arange(T, device=q_.device)
        return F.scaled_dot_product_attention(q_, k_, v_, attn_mask=(pos[None, :] <= pos[:, None])
                                              & (pos[:, None] - pos[None, :] < window))

    o = cached_window_attention(q, k, v, kv, window, scores=dot_product_scores, prefill=prefill)
    return attn._out(o)


# ----------------------------------------------------------------------------- AR-SSM
class SsmCache:
    """Conv tail (b, d_model, K-1) in the input dtype and state S (b, H, r, dv), fp32."""

    def __init__(self):
        self.conv: torch.Tensor | None = None
        self.state: torch.Tensor | None = None
        self.pos = 0


def _conv_last(ssm, seq: torch.Tensor) -> torch.Tensor:
    """The causal conv's output for the last of the K inputs seq (b, d, K): (b, 1, d). A
    weighted sum (conv1d's setup costs more than the token)."""
    w, bias = ssm.conv_weight[:, 0], ssm.conv_bias
    if torch.is_autocast_enabled(seq.device.type):  # what conv1d under autocast computes in
        dt_ = torch.get_autocast_dtype(seq.device.type)
        seq, w, bias = seq.to(dt_), w.to(dt_), bias.to(dt_)
    return ((seq * w).sum(-1) + bias).unsqueeze(1)


def ssm_step(ssm, u: torch.Tensor, conv: torch.Tensor, state: torch.Tensor, projected=None):
    """One token u (b, 1, d) after conv tail ``conv`` (b, d, K-1) and state S (b, H, r, dv):
    (output (b, 1, d), the new conv tail, the new state). Fixed shapes, no host reads: the
    static step (:mod:`.static`) runs it too. ``projected``: the outputs of the module's
    ``input_projections()`` on u, already computed (a block's fused decode step)."""
    sdt = state.dtype
    seq = torch.cat([conv.to(u.dtype), u.transpose(1, 2)], dim=-1)  # (b, d, K)
    x, xT, BT, CT, ldT, _ = ssm.project(_conv_last(ssm, seq))
    with torch.autocast(u.device.type, enabled=False):
        decay = ldT[:, :, 0].to(sdt).exp()[..., None, None]
        S = decay * state + BT[:, :, 0, :, None].to(sdt) * xT[:, :, 0, None, :].to(sdt)
        y = torch.einsum("bhr,bhrd->bhd", CT[:, :, 0].to(sdt), S).unsqueeze(2).to(x.dtype)
    return ssm.output(u, x, y, projected), seq[..., 1:], S


def ssm_forward_cached(ssm, u: torch.Tensor, cache: SsmCache) -> torch.Tensor:
    b, t, _ = u.shape
    H, r, dv, K = ssm.n_heads, ssm.max_rank, ssm.head_dim, ssm.conv_size
    sdt = torch.float64 if u.dtype == torch.float64 else torch.float32
    if cache.conv is None:  # zeros = the training conv's left padding
        cache.conv = u.new_zeros(b, ssm.d_model, K - 1)
        cache.state = torch.zeros(b, H, r, dv, dtype=sdt, device=u.device)
    if t == 1 and cache.pos > 0:  # one recurrence step
        out, cache.conv, cache.state = ssm_step(ssm, u, cache.conv, cache.state)
        cache.pos += 1
        return out
    seq = torch.cat([cache.conv.to(u.dtype), u.transpose(1, 2)], dim=-1)  # (b, d, K-1+t)
    if t == 1:
        up = _conv_last(ssm, seq)
    else:
        up = F.conv1d(seq, ssm.conv_weight, ssm.conv_bias, groups=ssm.d_model).transpose(1, 2)
    cache.conv = seq[..., seq.shape[-1] - (K - 1) :]
    x, xT, BT, CT, ldT, _ = ssm.project(up)

    # The parallel scan (prefill), plus the entering state in closed form.
    S0 = cache.state
    y = ssm.scan_impl(xT, BT, CT, ldT, ssm.chunk_size)
    with torch.autocast(u.device.type, enabled=False):
        ld = ldT.to(sdt)
        B32, x32 = BT.to(sdt), xT.to(sdt)
        if cache.pos > 0:
            cum = ld.cumsum(-1)
            y = (y.to(sdt) + torch.einsum("bhtr,bhrd->bhtd", CT.to(sdt) * cum.exp()[..., None], S0)).to(x.dtype)
        suffix = ld.flip(-1).cumsum(-1).flip(-1)  # sum_{s >= j}
        to_end = torch.cat([suffix[..., 1:], torch.zeros_like(suffix[..., :1])], dim=-1)  # sum_{s > j}
        S = suffix[..., :1, None].exp() * S0 + torch.einsum("bht,bhtr,bhtd->bhrd", to_end.exp(), B32, x32)
    cache.state = S
    cache.pos += t
    return ssm.output(u, x, y)
