"""Torch reference of the HTT (tensor-train) embedding op, and the layout it reads.

Cores G_k of shape (r_{k-1}, v_k, d_k, r_k), r_0 = r_K = 1, hold the table
E[i, j] = scale * G_1[:, i_1, j_1, :] @ ... @ G_K[:, i_K, j_K, :] with i and j in mixed radix
(most significant digit first; docs/model.md). :func:`htt_embedding_reference` gathers rows
per token (the Triton kernel in :mod:`.kernel` is checked against it); :func:`htt_full_table`
builds the whole table (a tied LM head rebuilds it once per step).
"""

from __future__ import annotations

import math

import torch

from phase7fw.errors import Phase7Error


def _iroot_ceil(n: int, k: int) -> int:
    """Smallest integer a >= 1 with a**k >= n (exact, no float rounding surprises)."""
    a = max(1, int(round(n ** (1.0 / k))))
    while a**k < n:
        a += 1
    while a > 1 and (a - 1) ** k >= n:
        a -= 1
    return a


def balanced_factors(n: int, k: int) -> list[int]:
    """k near-equal integer factors whose product is >= n, largest first.

    Greedy: the first factor is ceil(n ** (1/k)), then the rest factor ceil(n / first) the same
    way. The product overshoots n by less than one "row" of the last factors, e.g.
    32000 -> [179, 179] (32041), 2048 -> [46, 45] (2070), 32000 / 3 cores -> [32, 32, 32].
    """
    if n < 1 or k < 1:
        raise Phase7Error(f"cannot factor {n} into {k} factors")
    factors = []
    rest = n
    for left in range(k, 0, -1):
        f = _iroot_ceil(rest, left)
        factors.append(f)
        rest = -(-rest // f)  # ceil division
    return sorted(factors, reverse=True)


# einsum equations contracting the rank bonds; letters a, b are bonds, x/y/z column digits,
# i/j/k row digits, n the flattened token axis.
_GATHERED_EQ = {2: "nxa,nay->nxy", 3: "nxa,nayb,nbz->nxyz"}
_FULL_EQ = {2: "ixa,ajy->ijxy", 3: "ixa,ajyb,bkz->ijkxyz"}


def _digits(ids: torch.Tensor, vocab_factors) -> torch.Tensor:
    """Mixed-radix digits of ``ids``: shape ids.shape + (n_cores,), most significant first."""
    # place values, most significant first: i_k = (i // radix_k) % v_k
    radix = [math.prod(vocab_factors[k + 1 :]) for k in range(len(vocab_factors))]
    ids = ids.long()
    return torch.stack([torch.div(ids, p, rounding_mode="floor") % v for p, v in zip(radix, vocab_factors)], dim=-1)


def htt_embedding_reference(ids: torch.Tensor, cores, scale: torch.Tensor, d_model: int) -> torch.Tensor:
    """Rows (*ids.shape, d_model) of the HTT table held by ``cores`` (G_k of shape
    (r_{k-1}, v_k, d_k, r_k), factors read from the shapes) times ``scale``.

    Gathers each core's slice at the token's digit and contracts the bonds per token; the full
    table is never built. Cost per token ~ prod(d_k) * r multiply-adds. ids must be in
    [0, vocab_size); not checked here, as that would sync with the device."""
    n_cores = len(cores)
    dig = _digits(ids.reshape(-1), [c.shape[1] for c in cores])
    slices = []
    for k, core in enumerate(cores):
        s = core.index_select(1, dig[:, k]).movedim(1, 0)  # (N, r_{k-1}, d_k, r_k)
        if k == 0:
            s = s.squeeze(1)  # r_0 = 1: (N, d_1, r_1)
        if k == n_cores - 1:
            s = s.squeeze(-1)  # r_K = 1
        slices.append(s)
    rows = torch.einsum(_GATHERED_EQ[n_cores], *slices)
    rows = rows.reshape(dig.shape[0], math.prod([c.shape[2] for c in cores]))
    rows = rows[:, :d_model] * scale
    return rows.reshape(*ids.shape, d_model)


def htt_full_table(cores, scale: torch.Tensor, vocab_size: int, d_model: int) -> torch.Tensor:
    """The (vocab_size, d_model) table the cores hold, times ``scale``."""
    rows, cols = math.prod(c.shape[1] for c in cores), math.prod(c.shape[2] for c in cores)
    squeezed = list(cores)
    squeezed[0] = squeezed[0].squeeze(0)
    squeezed[-1] = squeezed[-1].squeeze(-1)
    full = torch.einsum(_FULL_EQ[len(cores)], *squeezed)  # (v_1..v_K, d_1..d_K)
    full = full.reshape(rows, cols)
    return full[:vocab_size, :d_model] * scale
