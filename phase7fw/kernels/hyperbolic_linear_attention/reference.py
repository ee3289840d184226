"""Torch forms of the hyperbolic linear attention op: the feature map, the chunked parallel
form (training, and the reference of the Triton kernel), the recurrent step (decoding) and
the quadratic masked form (tests only). See the package docstring for the maths.

Every form computes in fp32 (fp64 when a query is fp64, for tight tests) with autocast off
and returns the values' dtype. The state of a sequence is one fp32 tensor S of shape
(B, H, D + 1, Dv + 1): feature rows (time-like first) x value columns, the last column
holding the normalizer (the values are extended with a constant 1).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

#: Klein radius of the feature points (scaled by sqrt(c)): |kappa| <= 0.995, so the pair term
#: 1 + kappa_q . kappa_k >= 1 - 0.995^2 ~ 0.01 stays positive under tf32/bf16 rounding of the
#: dot products (error ~1e-3). In the Poincare ball this is Euclidean radius
#: tanh(MAX_ATANH) ~ 0.905/sqrt(c); the key features are then <= cosh(2 MAX_ATANH) = 10.
MAX_KLEIN_RADIUS = 0.995
#: the matching clamp of a = sqrt(c)|u| (tanh(2a) = MAX_KLEIN_RADIUS)
MAX_ATANH = 0.5 * math.atanh(MAX_KLEIN_RADIUS)
_MIN_NORM = 1e-15
#: Lower bound of the normalizer. It is >= 1 - MAX_KLEIN_RADIUS^2 by construction (the
#: package docstring); the clamp only guards against a bug producing a non-positive value.
DEN_EPS = 1e-6


def _dtype(*ts: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32


def _per_head(c, H: int, dtype, device) -> torch.Tensor:
    c = c if isinstance(c, torch.Tensor) else torch.tensor(float(c))
    c = c.to(device=device, dtype=dtype)
    if c.numel() == 1:
        return c.reshape(1).expand(H)
    if c.shape != (H,):
        raise ValueError(f"hyperbolic linear attention: curvature must be a scalar or of shape ({H},),"
                         f" got {tuple(c.shape)}")
    return c


def feature_map(u: torch.Tensor, c, focus_power: float = 1.0, *, query: bool = False) -> torch.Tensor:
    """phi(u) (B, H, T, D + 1) in fp32 (fp64 for fp64 input) for tangent vectors u (B, H, T, D)
    and curvature c (scalar or (H,)).

    u is mapped to the Poincare ball, x = expmap0(u) = tanh(a) u / (sqrt(c)|u|) with
    a = sqrt(c)|u| clamped at :data:`MAX_ATANH`, and lifted to the hyperboloid of the Lorentz
    model (scaled to curvature -1): L(u) = (cosh 2a, sinh 2a * f(u/|u|)), since
    (1 + c|x|^2) / (1 - c|x|^2) = cosh 2a and 2 sqrt(c) x / (1 - c|x|^2) = sinh 2a u/|u|.
    Keys use L(u). Queries use L(u) / cosh 2a = (1, kappa), kappa = tanh 2a f(u/|u|) (the
    Beltrami-Klein point in homogeneous coordinates): the query's time coordinate is a factor
    of a whole row of weights and cancels in the normalization, and leaving it out keeps the
    pair term 1 + kappa_q . kappa_k away from cancellation. ``f`` focuses the direction: the
    unit vector raised elementwise to ``focus_power`` (sign kept), renormalized (1: identity).
    phi_query(q) . phi_key(k) = cosh 2b (1 + kappa_q . kappa_k) >= 1 - MAX_KLEIN_RADIUS^2 > 0.
    """
    time, space = feature_parts(u, c, focus_power, query=query)
    return torch.cat([time.unsqueeze(-1), space], dim=-1)


def feature_parts(u: torch.Tensor, c, focus_power: float = 1.0, *, query: bool = False):
    """:func:`feature_map` as its time-like column (B, H, T) and space-like part (B, H, T, D),
    two tensors (the Triton kernel reads them so, with no concatenation to split)."""
    dt = _dtype(u)
    with torch.autocast(device_type=u.device.type, enabled=False):
        u = u.to(dt)
        H = u.shape[1]
        c = _per_head(c, H, dt, u.device).view(H, 1, 1)
        n = u.norm(dim=-1, keepdim=True).clamp_min(_MIN_NORM)
        direction = u / n
        if focus_power != 1.0:
            powered = direction.sign() * direction.abs().pow(focus_power)
            # a unit vector has a coordinate >= 1/sqrt(D): the norm is >= D^(-p/2) > 0
            direction = powered / powered.norm(dim=-1, keepdim=True)
        a2 = 2.0 * (c.sqrt() * n).clamp_max(MAX_ATANH)
        if query:
            return torch.ones_like(a2).squeeze(-1), torch.tanh(a2) * direction
        return torch.cosh(a2).squeeze(-1), torch.sinh(a2) * direction


def _prepare(q, k, v, c, log_decay, focus_power):
    B, H, T, D = q.shape
    if k.shape != q.shape or v.shape[:3] != (B, H, T) or (log_decay is not None and log_decay.shape != (B, H, T)):
        raise ValueError(
            "hyperbolic linear attention: expected q, k (B,H,T,D), v (B,H,T,Dv), log_decay (B,H,T) or None; got"
            f" q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)},"
            f" log_decay {None if log_decay is None else tuple(log_decay.shape)}")
    dt = _dtype(q, k, v)
    fq, fk = feature_map(q.to(dt), c, focus_power, query=True), feature_map(k.to(dt), c, focus_power)
    vv = torch.cat([v.to(dt), v.new_ones(B, H, T, 1, dtype=dt)], dim=-1)  # last column: normalizer
    ld = q.new_zeros(B, H, T, dtype=dt) if log_decay is None else log_decay.to(dt)
    return fq, fk, vv, ld


def _normalize(y: torch.Tensor, dtype) -> torch.Tensor:
    return (y[..., :-1] / y[..., -1:].clamp_min(DEN_EPS)).to(dtype)


def empty_state(B: int, H: int, D: int, Dv: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """The state of an empty prefix: zeros (B, H, D + 1, Dv + 1)."""
    return torch.zeros(B, H, D + 1, Dv + 1, device=device, dtype=dtype)


def hyperbolic_linear_attention_quadratic(q, k, v, c, log_decay=None, focus_power: float = 1.0):
    """The T x T masked form, for tests: o_t = sum_s w_ts v_s / sum_s w_ts with
    w_ts = exp(G_t - G_s) phi(q_t) . phi(k_s) for s <= t (G: running sum of log_decay)."""
    with torch.autocast(device_type=q.device.type, enabled=False):
        fq, fk, vv, ld = _prepare(q, k, v, c, log_decay, focus_power)
        T = q.shape[2]
        G = ld.cumsum(-1)
        causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
        decay = (G[..., :, None] - G[..., None, :]).masked_fill(~causal, float("-inf")).exp()
        y = ((fq @ fk.transpose(-1, -2)) * decay) @ vv
        return _normalize(y, v.dtype)


def hyperbolic_linear_attention_chunked(q, k, v, c, log_decay=None, focus_power: float = 1.0,
                                        chunk_size: int = 64, state: torch.Tensor | None = None,
                                        return_state: bool = False):
    """The chunked parallel form (Mamba-2's SSD block decomposition): within a chunk of Q
    tokens the masked Q x Q weights times the values; across chunks a carried fp32 state.
    Memory O(T (D + Dv) + T Q): no T x T tensor. ``state`` continues a sequence (its final
    state is returned with ``return_state``), as a cached prompt does."""
    if chunk_size < 1:
        raise ValueError(f"hyperbolic linear attention: chunk_size must be >= 1, got {chunk_size}")
    B, H, T, D = q.shape
    Dv = v.shape[-1]
    with torch.autocast(device_type=q.device.type, enabled=False):
        fq, fk, vv, ld = _prepare(q, k, v, c, log_decay, focus_power)
        dt = fq.dtype
        s = empty_state(B, H, D, Dv, q.device, dt) if state is None else state.to(dt)
        if T == 0:
            out = v.new_zeros(B, H, 0, Dv)
            return (out, s) if return_state else out
        Q = min(chunk_size, T)
        n = -(-T // Q)
        pad = n * Q - T
        if pad:  # zero features and decay 1 after the end: causal, so nothing before changes
            fq, fk, vv = (F.pad(t, (0, 0, 0, pad)) for t in (fq, fk, vv))
            ld = F.pad(ld, (0, pad))
        fq, fk, vv = (t.reshape(B, H, n, Q, t.shape[-1]) for t in (fq, fk, vv))
        cum = ld.reshape(B, H, n, Q).cumsum(-1)
        causal = torch.ones(Q, Q, dtype=torch.bool, device=q.device).tril()
        decay = (cum[..., :, None] - cum[..., None, :]).masked_fill(~causal, float("-inf")).exp()
        y = ((fq @ fk.transpose(-1, -2)) * decay) @ vv  # within each chunk
        to_end = (cum[..., -1:] - cum).exp()
        local = (fk * to_end[..., None]).transpose(-1, -2) @ vv  # (B, H, n, D+1, Dv+1)
        chunk_decay = cum[..., -1].exp()
        entering = []
        for i in range(n):  # n = T / Q short steps carry the state
            entering.append(s)
            s = chunk_decay[:, :, i, None, None] * s + local[:, :, i]
        y = y + (fq * cum.exp()[..., None]) @ torch.stack(entering, dim=2)
        out = _normalize(y.reshape(B, H, n * Q, Dv + 1)[:, :, :T], v.dtype)
    return (out, s) if return_state else out


def hyperbolic_linear_attention_step(q, k, v, c, log_decay, state: torch.Tensor, focus_power: float = 1.0):
    """The recurrent form for T new tokens, one at a time (T = 1 when decoding):
    S_t = exp(log_decay_t) S_{t-1} + phi(k_t) [v_t, 1]^T, o_t = phi(q_t) S_t normalized.
    ``state`` (B, H, D+1, Dv+1) fp32 is updated in place (its address never changes, so a CUDA
    graph can replay the step); returns o (B, H, T, Dv) in v's dtype."""
    with torch.autocast(device_type=q.device.type, enabled=False):
        fq, fk, vv, ld = _prepare(q, k, v, c, log_decay, focus_power)
        outs = []
        for t in range(q.shape[2]):
            new = ld[:, :, t, None, None].exp() * state.to(fq.dtype) + fk[:, :, t, :, None] * vv[:, :, t, None, :]
            state.copy_(new)
            outs.append(fq[:, :, t, None, :] @ new)
        y = torch.cat(outs, dim=2)
        return _normalize(y, v.dtype)
