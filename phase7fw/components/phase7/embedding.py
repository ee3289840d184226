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
from phase7fw.kernels.htt_embedding import balanced_factors, htt_embedding, htt_full_table
from phase7fw.recipe.options import in_range, option, positive


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
        self.gather_fn = htt_embedding

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
        return htt_full_table(list(self.cores), self.scale, self.vocab_size, self.d_model)

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
