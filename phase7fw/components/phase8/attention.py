"""``attention = "hyperbolic_linear"``: causal linear-time attention in hyperbolic space.

Per head h (the maths of the op: :mod:`phase7fw.kernels.hyperbolic_linear_attention`,
docs/model.md "Phase 8"):

    q, k, v   = W_q u, W_k u, W_v u                      tangent vectors at the origin
    c_h       = clamp(kappa * exp(rho_h), c_min, c_max)  learned per head, kappa from the curvature scheduler
    lambda_t  = exp(-softplus(w_h . u_t + b_h))          data-dependent decay in (0, 1) (``decay = "data"``)
    S_t       = lambda_t S_{t-1} + phi_k(k_t) [v_t, 1]^T    (D+1) x (Dv+1), fp32
    o_t       = phi_q(q_t) S_t[:, :Dv] / phi_q(q_t) S_t[:, Dv]
    out       = W_o concat_h(o)

No positional rotation: order enters through the decay (and the block's SSM path with its
causal convolution). Training runs the op's chunked form (``attention_fn``; ``[kernels]
hyperbolic_linear_attention = "triton"`` swaps in the Triton kernel, ``"fla"``
flash-linear-attention's GLA kernels); cached decoding keeps
only the state S per layer (no growth with the context) and runs the recurrent step.

Factories are called as ``factory(config, *, d_model, n_heads, seq_len, layer_idx, **context)``
like every attention (optional ``n_layers`` scales the output projection's init).
"""

from __future__ import annotations

import math
from typing import Literal

import attrs
import torch
import torch.nn.functional as F
from torch import nn

from phase7fw.errors import Phase7Error
from phase7fw.hookspecs import hookimpl
from phase7fw.kernels.hyperbolic_linear_attention import (
    empty_state,
    hyperbolic_linear_attention,
    hyperbolic_linear_attention_chunked,
    hyperbolic_linear_attention_step,
)
from phase7fw.recipe.options import option, positive

__all__ = ["HyperbolicLinearAttention", "HyperbolicLinearAttentionConfig", "build_hyperbolic_linear_attention"]

#: Per-head decay rates softplus(b_h) at init, geometric from DECAY_MIN to DECAY_MAX across the
#: heads: memories from ~10 to ~10,000 tokens (lambda = exp(-rate)).
DECAY_MIN, DECAY_MAX = 1e-4, 1e-1


def _power_of_two_chunk(v):
    if v < 16 or v & (v - 1):
        return f"must be a power of two >= 16 (the Triton kernel's tile), got {v!r}"
    return None


def _at_least_one(v):
    return None if v >= 1.0 else f"must be >= 1 (1: no focusing), got {v!r}"


@attrs.frozen
class HyperbolicLinearAttentionConfig:
    chunk_size: int = option(64, check=_power_of_two_chunk, help="tokens per chunk of the chunked (training) form")
    focus_power: float = option(1.0, check=_at_least_one, help="focusing power of the feature directions (1: none)")
    decay: Literal["data", "none"] = option("data", help='"data": learned per-token decay per head; "none": no decay')
    c_min: float = option(1e-3, check=positive, help="lower clamp of the effective curvature")
    c_max: float = option(10.0, check=positive, help="upper clamp of the effective curvature")


def _inverse_softplus(y: torch.Tensor) -> torch.Tensor:
    return y + torch.log(-torch.expm1(-y))


def _assign(param: torch.Tensor, value: torch.Tensor) -> None:
    """``param.copy_(value)``, also for a parameter sharded by FSDP2 (a DTensor: the value is
    sharded the same way first; mixing a plain tensor into a DTensor op is an error)."""
    value = value.to(device=param.device, dtype=param.dtype)
    mesh = getattr(param, "device_mesh", None)
    if mesh is not None:
        from torch.distributed.tensor import distribute_tensor

        value = distribute_tensor(value, mesh, param.placements)
    param.copy_(value)


class LinearAttentionCache:
    """A layer's decode state: the fp32 state S (B, H, D+1, Dv+1), ``None`` while empty."""

    def __init__(self):
        self.state: torch.Tensor | None = None


class StaticLinearAttention:
    """The state of a :class:`LinearAttentionCache` in a fixed buffer (what a CUDA graph reads
    and writes in place)."""

    def __init__(self, cache: LinearAttentionCache):
        if cache.state is None:
            raise ValueError("StaticLinearAttention needs a filled cache (run a prompt first)")
        self.state = cache.state.clone()

    def load(self, cache: LinearAttentionCache) -> None:
        self.state.copy_(cache.state)

    def store(self, cache: LinearAttentionCache, pos: int) -> None:
        cache.state = self.state.clone()


class HyperbolicLinearAttention(nn.Module):
    """Linear-time hyperbolic attention (module docstring)."""

    attention_kind = "hyperbolic"  # the bench's report: not SDPA (the op is hyperbolic_linear_attention)

    def __init__(self, d_model: int, n_heads: int, *, chunk_size: int = 64, focus_power: float = 1.0,
                 decay: str = "data", c_min: float = 1e-3, c_max: float = 10.0, n_layers: int = 1):
        super().__init__()
        if d_model % n_heads:
            raise Phase7Error(f"attention: d_model {d_model} is not divisible by n_heads {n_heads}")
        if not 0 < c_min <= c_max:
            raise Phase7Error(f"attention: need 0 < c_min <= c_max, got c_min={c_min}, c_max={c_max}")
        self.d_model, self.n_heads, self.head_dim = d_model, n_heads, d_model // n_heads
        self.n_layers = n_layers
        self.chunk_size, self.focus_power = chunk_size, focus_power
        self.c_min, self.c_max = c_min, c_max
        self.q_proj = nn.Linear(d_model, d_model, bias=False)
        self.k_proj = nn.Linear(d_model, d_model, bias=False)
        self.v_proj = nn.Linear(d_model, d_model, bias=False)
        self.o_proj = nn.Linear(d_model, d_model, bias=False)
        # per-token, per-head decay logits (a vector bias: FSDP2 refuses 0-dim parameters)
        self.decay_proj = nn.Linear(d_model, n_heads, bias=True) if decay == "data" else None
        self.log_c = nn.Parameter(torch.zeros(n_heads))  # rho: learned log-curvature per head
        self._kappa = 1.0
        # kappa: set by the curvature scheduler in place (compiled graphs read it as data)
        self.register_buffer("kappa", torch.ones((), dtype=torch.float32), persistent=False)
        #: the op's chunked form; kernel selection may swap in the Triton kernel (same signature)
        self.attention_fn = hyperbolic_linear_attention

    # ------------------------------------------------------------------ parameters
    def set_curvature(self, kappa: float) -> None:
        self._kappa = float(kappa)
        with torch.no_grad():
            self.kappa.fill_(self._kappa)

    def curvature(self) -> torch.Tensor:
        """Per-head effective curvature c = clamp(kappa * exp(log_c), c_min, c_max), (H,) fp32."""
        return (self.kappa.float() * self.log_c.float().exp()).clamp(self.c_min, self.c_max)

    def init_weights(self) -> None:
        std = self.d_model**-0.5
        # |q|, |k| ~ 1 for unit-RMS inputs: points start inside the ball, away from the clamp
        nn.init.normal_(self.q_proj.weight, std=(self.d_model * self.head_dim) ** -0.5)
        nn.init.normal_(self.k_proj.weight, std=(self.d_model * self.head_dim) ** -0.5)
        nn.init.normal_(self.v_proj.weight, std=std)
        nn.init.normal_(self.o_proj.weight, std=std / math.sqrt(2 * self.n_layers))
        with torch.no_grad():
            self.log_c.zero_()
            self.kappa.fill_(self._kappa)
            if self.decay_proj is not None:
                self.decay_proj.weight.normal_(0.0, 0.1 * std)
                rates = torch.logspace(math.log10(DECAY_MIN), math.log10(DECAY_MAX), self.n_heads, dtype=torch.float64)
                _assign(self.decay_proj.bias, _inverse_softplus(rates))

    # ------------------------------------------------------------------ forward
    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        B, T, _ = t.shape
        return t.reshape(B, T, self.n_heads, -1).transpose(1, 2)

    def input_projections(self) -> list[nn.Linear]:
        """The linear maps of the block's normed input, in the order :meth:`_inputs` takes their
        outputs: a block may fuse them into one matmul for decoding."""
        return [self.q_proj, self.k_proj, self.v_proj] + ([self.decay_proj] if self.decay_proj is not None else [])

    def _inputs(self, u: torch.Tensor, projected=None):
        """q, k, v (B, H, T, D), the log-decays (B, H, T) fp32 or None, and c (H,).
        ``projected``: the outputs of :meth:`input_projections` on u, already computed."""
        outs = projected or [lin(u) for lin in self.input_projections()]
        q, k, v = (self._heads(t) for t in outs[:3])
        ld = None
        if self.decay_proj is not None:
            # (B, H, T) made contiguous before the softplus: compiled backward graphs then agree
            # with eager on the strides of softplus's gradient (torch 2.13, aot_eager)
            ld = -F.softplus(outs[3].float().transpose(1, 2).contiguous())
        return q, k, v, ld, self.curvature()

    def _out(self, o: torch.Tensor) -> torch.Tensor:
        B, H, T, D = o.shape
        return self.o_proj(o.transpose(1, 2).reshape(B, T, H * D))

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        q, k, v, ld, c = self._inputs(u)
        return self._out(self.attention_fn(q, k, v, c, ld, self.focus_power, self.chunk_size))

    def attention_flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward = 3x forward): the within-chunk Q x Q
        weights and their values (like a window of Q), and the state read-out and update
        (2 (D+1)(Dv+1) each)."""
        D = self.head_dim
        window = 2 * 2 * min(self.chunk_size, seq_len) * D
        state = 2 * 2 * (D + 1) * (D + 1)
        return 3.0 * self.n_heads * (window + state)

    def attention_scores_per_token(self, seq_len: int) -> int:
        """Weights a token keeps for the backward: its chunk's, per head."""
        return self.n_heads * min(self.chunk_size, seq_len)

    # ------------------------------------------------------------------ cached decoding
    def init_cache(self, batch_size: int = 1) -> LinearAttentionCache:
        return LinearAttentionCache()

    def forward_cached(self, u: torch.Tensor, cache: LinearAttentionCache, start: int) -> torch.Tensor:
        """``forward`` for tokens following those summarized in ``cache`` (any number of them:
        a prompt runs the chunked form from the cached state, a single token the recurrence)."""
        q, k, v, ld, c = self._inputs(u)
        B, H, T, D = q.shape
        if cache.state is None:
            cache.state = empty_state(B, H, D, v.shape[-1], device=u.device)
        if T == 1:
            o = hyperbolic_linear_attention_step(q, k, v, c, ld, cache.state, self.focus_power)
        else:
            o, cache.state = hyperbolic_linear_attention_chunked(
                q, k, v, c, ld, self.focus_power, self.chunk_size, state=cache.state, return_state=True)
        return self._out(o)

    # ------------------------------------------------------------------ static step
    def init_static_cache(self, cache: LinearAttentionCache) -> StaticLinearAttention:
        return StaticLinearAttention(cache)

    def forward_static(self, u: torch.Tensor, static: StaticLinearAttention, pos: torch.Tensor,
                       projected=None) -> torch.Tensor:
        """One token: the recurrent step on the fixed state buffer (no position needed)."""
        q, k, v, ld, c = self._inputs(u, projected)
        return self._out(hyperbolic_linear_attention_step(q, k, v, c, ld, static.state, self.focus_power))

    def extra_repr(self) -> str:
        return (f"heads={self.n_heads}, head_dim={self.head_dim}, chunk={self.chunk_size},"
                f" decay={'data' if self.decay_proj is not None else 'none'}, focus={self.focus_power},"
                f" c in [{self.c_min}, {self.c_max}]")


def build_hyperbolic_linear_attention(config: HyperbolicLinearAttentionConfig, *, d_model: int, n_heads: int,
                                      seq_len: int, layer_idx: int, **context) -> HyperbolicLinearAttention:
    module = HyperbolicLinearAttention(
        d_model, n_heads, chunk_size=config.chunk_size, focus_power=config.focus_power, decay=config.decay,
        c_min=config.c_min, c_max=config.c_max, n_layers=context.get("n_layers", 1))
    # [kernels] hyperbolic_linear_attention: the Triton kernel or fla's (same signature, no parameters)
    from phase7fw.kernels import select

    module.attention_fn = select(context, "hyperbolic_linear_attention", module.attention_fn)
    return module


@hookimpl
def register_components(register):
    register(
        "attention",
        "hyperbolic_linear",
        build_hyperbolic_linear_attention,
        HyperbolicLinearAttentionConfig,
        description="O(T) causal linear attention with a Lorentz-model feature map, learned curvature and"
        " decay (Phase 8); O(1) decode state",
    )
