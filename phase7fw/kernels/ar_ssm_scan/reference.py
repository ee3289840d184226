"""Torch references of the AR-SSM scan op (the Triton kernel in :mod:`.kernel` is checked
against them):

- :func:`ar_ssm_scan_sequential`: the plain recurrence, one step at a time (the test oracle);
- :func:`ar_ssm_scan_reference`: the chunked SSD form (matmuls within chunks, a carried state
  between them), what the model runs by default.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    # State and accumulation are fp32 at least; fp64 stays fp64 (for tight tests).
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _check_scan_shapes(x, B, C, log_decay):
    b, h, t, _ = x.shape
    if B.shape[:3] != (b, h, t) or C.shape != B.shape or log_decay.shape != (b, h, t):
        raise ValueError(
            f"ar_ssm scan: expected x (b,h,t,dv), B and C (b,h,t,r), log_decay (b,h,t); got"
            f" x {tuple(x.shape)}, B {tuple(B.shape)}, C {tuple(C.shape)}, log_decay {tuple(log_decay.shape)}"
        )


def ar_ssm_scan_sequential(x, B, C, log_decay):
    """Reference recurrence, one time step at a time.

    Shapes: x (b, h, T, dv), B and C (b, h, T, r), log_decay (b, h, T) = log lambda <= 0.
    Returns y (b, h, T, dv) in x's dtype with y_t = C_t^T S_t, S_t = exp(log_decay_t) S_{t-1}
    + B_t x_t^T, S_0 = 0 (the D skip is not included). Computed in fp32 (fp64 for fp64 inputs).
    """
    _check_scan_shapes(x, B, C, log_decay)
    dt = _compute_dtype(x)
    with torch.autocast(x.device.type, enabled=False):
        x32, B32, C32, decay = x.to(dt), B.to(dt), C.to(dt), log_decay.to(dt).exp()
        b, h, T, dv = x.shape
        state = x32.new_zeros(b, h, B.shape[-1], dv)
        ys = []
        for t in range(T):
            state = decay[:, :, t, None, None] * state + B32[:, :, t, :, None] * x32[:, :, t, None, :]
            ys.append(torch.einsum("bhr,bhrd->bhd", C32[:, :, t], state))
        y = torch.stack(ys, dim=2) if ys else x32.new_zeros(b, h, 0, dv)
    return y.to(x.dtype)


def ar_ssm_scan_reference(x, B, C, log_decay, chunk_size: int = 64):
    """Chunked (SSD-style) evaluation of :func:`ar_ssm_scan_sequential`; same shapes and result.

    T is right-padded to a multiple of Q = chunk_size (zeros, decay 1: causal, so the padding
    changes nothing before it). Within a chunk, with cum_i = sum_{s<=i} log_decay_s,

        y_intra_i = sum_{j<=i} (C_i . B_j) * exp(cum_i - cum_j) * x_j      # masked (Q x Q) matmuls

    and the state entering the chunk, S_in, adds y_inter_i = exp(cum_i) * C_i^T S_in. The state
    is carried chunk to chunk: S_out = exp(cum_last) * S_in + sum_j exp(cum_last - cum_j) B_j x_j^T.
    The decay differences are masked to -inf above the diagonal before exp, so no inf * 0 appears
    in values or gradients. Everything runs in fp32 (fp64 for fp64 inputs) with autocast off.
    """
    _check_scan_shapes(x, B, C, log_decay)
    if chunk_size < 1:
        raise ValueError(f"ar_ssm scan: chunk_size must be >= 1, got {chunk_size}")
    dt = _compute_dtype(x)
    b, h, T, dv = x.shape
    r = B.shape[-1]
    if T == 0:
        return x.new_zeros(b, h, 0, dv)
    Q = min(chunk_size, T)
    n = -(-T // Q)
    pad = n * Q - T
    with torch.autocast(x.device.type, enabled=False):
        x32, B32, C32, ld = x.to(dt), B.to(dt), C.to(dt), log_decay.to(dt)
        if pad:
            x32, B32, C32 = (F.pad(a, (0, 0, 0, pad)) for a in (x32, B32, C32))
            ld = F.pad(ld, (0, pad))
        x32 = x32.reshape(b, h, n, Q, dv)
        B32 = B32.reshape(b, h, n, Q, r)
        C32 = C32.reshape(b, h, n, Q, r)
        cum = ld.reshape(b, h, n, Q).cumsum(-1)  # (b, h, n, Q)

        # Intra-chunk: L_ij = prod_{j<s<=i} lambda_s for i >= j, else 0.
        causal = torch.ones(Q, Q, dtype=torch.bool, device=x.device).tril()
        diff = (cum[..., :, None] - cum[..., None, :]).masked_fill(~causal, float("-inf"))
        scores = torch.einsum("bhnir,bhnjr->bhnij", C32, B32) * diff.exp()
        y = torch.einsum("bhnij,bhnjd->bhnid", scores, x32)

        # Each chunk's own contribution to the state at its end.
        to_end = (cum[..., -1:] - cum).exp()  # (b, h, n, Q)
        local = torch.einsum("bhnj,bhnjr,bhnjd->bhnrd", to_end, B32, x32)
        chunk_decay = cum[..., -1].exp()  # (b, h, n)

        # Carry the state across chunks (n = T / Q steps, short) and read it out.
        state = x32.new_zeros(b, h, r, dv)
        entering = []
        for c in range(n):
            entering.append(state)
            state = chunk_decay[:, :, c, None, None] * state + local[:, :, c]
        s_in = torch.stack(entering, dim=2)  # (b, h, n, r, dv)
        y = y + torch.einsum("bhnir,bhnrd->bhnid", C32 * cum.exp()[..., None], s_in)

        y = y.reshape(b, h, n * Q, dv)[:, :, :T]
    return y.to(x.dtype)
