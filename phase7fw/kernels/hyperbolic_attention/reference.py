"""Torch references of the hyperbolic attention op (the Triton kernel in :mod:`.kernel` is
checked against them).

:func:`hyperbolic_attention_reference` is the blockwise O(T W)-memory form the model runs by
default; :func:`dense_masked_hyperbolic_attention` is an independent T x T form built from
:mod:`.geometry` ball points, for tests. Scores (``score``): ``"distance"`` -tau_h d,
``"squared_distance"`` -tau_h d^2, ``"dot_distance"`` <q_i, k_j>/sqrt(D) - tau_h d, with
d = d_c(expmap0(q_i), expmap0(k_j)) for i - W < j <= i.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from phase7fw.kernels.hyperbolic_attention import geometry


def sliding_window_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int) -> torch.Tensor:
    """True where query position i may attend key position j: 0 <= j <= i and i - j < window."""
    i = q_pos.unsqueeze(-1)
    j = k_pos.unsqueeze(-2)
    return (j <= i) & (i - j < window) & (j >= 0)


def _per_head(t, n_heads: int, dtype, device) -> torch.Tensor:
    """A scalar or (H,) tensor/float as an (H,) tensor of ``dtype`` (differentiable)."""
    t = t.to(device=device, dtype=dtype) if isinstance(t, torch.Tensor) else torch.tensor(
        float(t), dtype=dtype, device=device
    )
    if t.dim() == 0:
        return t.expand(n_heads)
    if t.shape != (n_heads,):
        raise ValueError(f"expected a scalar or a tensor of shape ({n_heads},), got {tuple(t.shape)}")
    return t


def _compute_dtype(q: torch.Tensor, k: torch.Tensor) -> torch.dtype:
    # Distances and softmax statistics are never computed below fp32 (bf16 cannot hold
    # points near the boundary); fp64 inputs stay fp64 for tests.
    return torch.float64 if torch.float64 in (q.dtype, k.dtype) else torch.float32


def _in_compute_dtype(q, k, v, c, tau):
    """q, k, v in the maths dtype (fp32, or fp64 when given fp64); c and tau as (H,) vectors."""
    dtype = _compute_dtype(q, k)
    H = q.shape[1]
    return (q.to(dtype), k.to(dtype), v.to(dtype), _per_head(c, H, dtype, q.device),
            _per_head(tau, H, dtype, q.device))


SCORES = ("distance", "squared_distance", "dot_distance")


def distance_scores(d: torch.Tensor, tau: torch.Tensor, score: str, dot: torch.Tensor | None = None) -> torch.Tensor:
    """Attention scores from distances d and (for ``dot_distance``) the dot products <q,k>
    already divided by sqrt(D); tau broadcasts against d."""
    if score == "distance":
        return -tau * d
    if score == "squared_distance":
        return -tau * (d * d)
    if score == "dot_distance":
        return dot - tau * d
    raise ValueError(f"score must be one of {', '.join(SCORES)}; got {score!r}")


def hyperbolic_attention_reference(q, k, v, c, tau, window: int, score: str = "distance") -> torch.Tensor:
    """Causal sliding-window hyperbolic attention, blockwise: O(T * W) memory.

    q, k, v: (B, H, T, D) (q, k already rotated); c: scalar tensor/float or (H,); tau: (H,);
    window W >= 1 (W >= T: full causal); ``score``: see :func:`distance_scores`.
    Returns (B, H, T, D) in v's dtype.

    Queries are split into blocks of Wb = min(W, T) positions; block b's keys are blocks
    b-1 and b, which hold every key in its window. Distances come from
    :func:`geometry.dist_from_tangent_stats` (one matmul <q, k> plus per-row scalars), in
    fp32 (or fp64) whatever the input dtype or autocast state.
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    B, H, T, D = q.shape
    out_dtype = v.dtype
    with torch.autocast(device_type=q.device.type, enabled=False):
        q, k, v, c, tau = _in_compute_dtype(q, k, v, c, tau)

        wb = min(window, T)
        nb = math.ceil(T / wb)
        pad = nb * wb - T
        if pad:
            # Padded keys sit at positions >= T, after every real query: causality masks them.
            q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))

        sq = geometry.tangent_stats(q, c.view(H, 1))  # each (B, H, Tp)
        sk = geometry.tangent_stats(k, c.view(H, 1))

        def blocks(t):  # (B, H, Tp, ...) -> (B, H, nb, wb, ...)
            return t.reshape(B, H, nb, wb, *t.shape[3:])

        def with_previous(t):  # keys of block b: blocks b-1 and b (zeros before block 0)
            t = blocks(t)
            if nb == 1:
                return t
            prev = F.pad(t, (0, 0) * (t.dim() - 4) + (0, 0, 1, 0))[:, :, :nb]  # shift blocks by one
            return torch.cat([prev, t], dim=3)

        qb = blocks(q)
        kb, vb = with_previous(k), with_previous(v)
        sqb = geometry.TangentStats(*(blocks(s).unsqueeze(-1) for s in sq))  # (B,H,nb,wb,1)
        skb = geometry.TangentStats(*(with_previous(s).unsqueeze(-2) for s in sk))  # (B,H,nb,1,L)
        dot = qb @ kb.transpose(-1, -2)  # (B, H, nb, wb, L), L = wb or 2 wb
        d = geometry.dist_from_tangent_stats(dot, sqb, skb, c.view(H, 1, 1, 1))
        scores = distance_scores(d, tau.view(H, 1, 1, 1), score, dot * D**-0.5)

        blk = torch.arange(nb, device=q.device).view(nb, 1)
        q_pos = blk * wb + torch.arange(wb, device=q.device)  # (nb, wb)
        k_first = (blk - (1 if nb > 1 else 0)) * wb
        k_pos = k_first + torch.arange(kb.shape[3], device=q.device)  # (nb, L)
        mask = sliding_window_mask(q_pos, k_pos, window)  # (nb, wb, L); j = i always allowed
        probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
        out = (probs @ vb).reshape(B, H, nb * wb, D)[:, :, :T]
    return out.to(out_dtype)


def dense_masked_hyperbolic_attention(q, k, v, c, tau, window: int, score: str = "distance") -> torch.Tensor:
    """Independent T x T reference: ball points from ``geometry.expmap0`` (projected to radius
    0.999/sqrt(c), matching the tangent clamp of the blockwise path), distances from
    ``geometry.pairwise_dist``, an explicit sliding-window mask. Memory O(T^2 D); tests only."""
    B, H, T, D = q.shape
    out_dtype = v.dtype
    with torch.autocast(device_type=q.device.type, enabled=False):
        q, k, v, c, tau = _in_compute_dtype(q, k, v, c, tau)
        edge = 1.0 - math.tanh(geometry.MAX_TANGENT_ATANH)  # = 1e-3: radius 0.999/sqrt(c)
        x = geometry.project(geometry.expmap0(q, c.view(H, 1)), c.view(H, 1), eps=edge)
        y = geometry.project(geometry.expmap0(k, c.view(H, 1)), c.view(H, 1), eps=edge)
        d = geometry.pairwise_dist(x, y, c.view(H, 1, 1))  # (B, H, T, T)
        pos = torch.arange(T, device=q.device)
        mask = sliding_window_mask(pos, pos, window)
        dot = (q @ k.transpose(-1, -2)) * D**-0.5
        scores = distance_scores(d, tau.view(H, 1, 1), score, dot).masked_fill(~mask, float("-inf"))
        out = torch.softmax(scores, dim=-1) @ v
    return out.to(out_dtype)
