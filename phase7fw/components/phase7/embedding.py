"""Token embeddings: ``htt`` (tensor-train compressed table) and ``dense``.

Both factories are called as ``factory(config, *, vocab_size, d_model, **context)`` and return
a module with

- ``forward(ids (B, T) int) -> (B, T, d_model)``
- ``weight_matrix() -> (vocab_size, d_model)``: the full table, for a tied LM head (the model
  rebuilds it once per optimizer step, not per micro-batch)
- ``compression_ratio() -> float``: vocab_size * d_model / stored parameters
- ``init_weights()``: fills every parameter from torch's RNG (modules are built on the meta
  device and materialized with ``to_empty`` first).

HTT layout (the tensor-train matrix format, the same one as ``tensorly.tt_matrix_to_matrix``):
row index i and column index j are written in mixed radix, most significant digit first,
``i = (i_1 * v_2 + i_2) * v_3 + i_3`` (likewise j over d_k), and

    E[i, j] = scale * G_1[:, i_1, j_1, :] @ G_2[:, i_2, j_2, :] @ ... @ G_K[:, i_K, j_K, :]

with cores G_k of shape (r_{k-1}, v_k, d_k, r_k), r_0 = r_K = 1. Rows i >= vocab_size are
never used; only the first d_model of prod(d_k) columns are kept.

Init (both kinds, so that swapping one for the other does not change the model's start):
rows have RMS ``init_std`` (default 0.02, i.e. like a dense N(0, 0.02) table). For HTT the
cores are drawn so the raw contraction has unit-variance entries, and the learned scalar
``scale`` starts at ``init_std``: the scale carries the magnitude, the cores the pattern.
"""

from __future__ import annotations

import math

import attrs
import torch
from torch import nn
import torch.nn.functional as F

from phase7fw.errors import Phase7Error
from phase7fw.hookspecs import hookimpl
from phase7fw.recipe.options import in_range, option, positive


# ----------------------------------------------------------------------------- factorization
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


# ----------------------------------------------------------------------------- configs
@attrs.frozen
class HttConfig:
    n_cores: int = option(2, check=in_range(2, 3), help="number of tensor-train cores (2 or 3)")
    rank: int = option(32, check=positive, help="tensor-train rank r_1 = ... = r_{K-1}")
    init_std: float = option(0.02, check=positive, help="initial RMS of a table row (via `scale`)")


@attrs.frozen
class DenseConfig:
    init_std: float = option(0.02, check=positive, help="std of the N(0, std) table init")


# ----------------------------------------------------------------------------- modules
class DenseEmbedding(nn.Module):
    """A plain (vocab_size, d_model) lookup table."""

    def __init__(self, vocab_size: int, d_model: int, init_std: float = 0.02):
        super().__init__()
        self.vocab_size, self.d_model, self.init_std = vocab_size, d_model, init_std
        self.weight = nn.Parameter(torch.empty(vocab_size, d_model))

    def init_weights(self) -> None:
        with torch.no_grad():
            self.weight.normal_(0.0, self.init_std)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)

    def weight_matrix(self) -> torch.Tensor:
        return self.weight

    def compression_ratio(self) -> float:
        return 1.0

    def extra_repr(self) -> str:
        return f"{self.vocab_size}, {self.d_model}"


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


class HTTEmbedding(nn.Module):
    """Tensor-train factorized embedding table (see the module docstring for the layout)."""

    def __init__(self, vocab_size: int, d_model: int, n_cores: int = 2, rank: int = 32, init_std: float = 0.02):
        super().__init__()
        if n_cores not in (2, 3):
            raise Phase7Error(f"embedding htt: n_cores must be 2 or 3, got {n_cores}")
        self.vocab_size, self.d_model, self.init_std = vocab_size, d_model, init_std
        self.n_cores, self.rank = n_cores, rank
        self.vocab_factors = balanced_factors(vocab_size, n_cores)
        self.dim_factors = balanced_factors(d_model, n_cores)
        self.ranks = [1] + [rank] * (n_cores - 1) + [1]
        self.cores = nn.ParameterList(
            nn.Parameter(torch.empty(self.ranks[k], v, d, self.ranks[k + 1]))
            for k, (v, d) in enumerate(zip(self.vocab_factors, self.dim_factors))
        )
        # Shape (1,) rather than 0-dim: sharding wrappers split dim 0.
        self.scale = nn.Parameter(torch.empty(1))
        # The per-token gather path; [kernels] htt_embedding = "triton" swaps in the fused kernel
        # (same signature, no parameters). weight_matrix() always stays einsum.
        self.gather_fn = htt_embedding_reference

    def init_weights(self) -> None:
        # Entry variance of the contraction = prod(r_k for inner bonds) * prod(std_k^2); equal
        # per-core std makes it 1 and keeps the cores' gradients on the same footing.
        std = math.prod(self.ranks) ** (-1.0 / (2 * self.n_cores))
        with torch.no_grad():
            for core in self.cores:
                core.normal_(0.0, std)
            self.scale.fill_(self.init_std)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.gather_fn(ids, list(self.cores), self.scale, self.d_model)

    def weight_matrix(self) -> torch.Tensor:
        cores = [c for c in self.cores]
        cores[0] = cores[0].squeeze(0)
        cores[-1] = cores[-1].squeeze(-1)
        full = torch.einsum(_FULL_EQ[self.n_cores], *cores)  # (v_1..v_K, d_1..d_K)
        full = full.reshape(math.prod(self.vocab_factors), math.prod(self.dim_factors))
        return full[: self.vocab_size, : self.d_model] * self.scale

    def compression_ratio(self) -> float:
        stored = sum(p.numel() for p in self.parameters())
        return self.vocab_size * self.d_model / stored

    def extra_repr(self) -> str:
        return (
            f"{self.vocab_size}, {self.d_model}, vocab_factors={self.vocab_factors},"
            f" dim_factors={self.dim_factors}, rank={self.rank}"
        )


# ----------------------------------------------------------------------------- factories
def _check_sizes(kind: str, vocab_size: int, d_model: int) -> None:
    if vocab_size < 1 or d_model < 1:
        raise Phase7Error(f"embedding {kind}: vocab_size and d_model must be >= 1, got {vocab_size}, {d_model}")


def build_htt(config: HttConfig, *, vocab_size: int, d_model: int, **context) -> HTTEmbedding:
    _check_sizes("htt", vocab_size, d_model)
    module = HTTEmbedding(vocab_size, d_model, config.n_cores, config.rank, config.init_std)
    # [kernels] htt_embedding: swap in the fused Triton gather (same signature, no parameters).
    from phase7fw.kernels import select

    module.gather_fn = select(context, "htt_embedding", module.gather_fn)
    return module


def build_dense(config: DenseConfig, *, vocab_size: int, d_model: int, **context) -> DenseEmbedding:
    _check_sizes("dense", vocab_size, d_model)
    return DenseEmbedding(vocab_size, d_model, config.init_std)


@hookimpl
def register_components(register):
    register(
        "embedding",
        "htt",
        build_htt,
        HttConfig,
        description="tensor-train factorized table (2-3 cores); context: vocab_size, d_model",
    )
    register(
        "embedding",
        "dense",
        build_dense,
        DenseConfig,
        description="plain lookup table; context: vocab_size, d_model",
    )
