"""Attention components: ``hyperbolic`` (Poincare-ball distance scores, sliding window) and
``sdpa`` (ordinary scaled dot-product attention, the baseline).

Factories are called as ``factory(config, *, d_model, n_heads, seq_len, layer_idx, **context)``
and return a module mapping (B, T, d_model) -> (B, T, d_model), projections included. The
optional context key ``n_layers`` scales the output-projection init (residual depth).

Hyperbolic attention, per head h (spec: design/MODEL.md):
    q, k = RoPE(N_q(W_q u)), RoPE(N_k(W_k u))   N: per-head RMS norm with learned gains (``qk_norm``)
    s_ij = <q_i, k_j>/sqrt(D) - tau_h * d_c(expmap0(q_i/sqrt(D)), expmap0(k_j/sqrt(D)))
                                           for i - W < j <= i   (``score = "dot_distance"``, the default)
    o_i  = sum_j softmax_j(s_ij) v_j
``score = "distance"`` uses -tau_h d alone and ``"squared_distance"`` -tau_h d^2; without ``qk_norm``
q and k go to the ball unscaled (the first design; measured against each other in docs/model.md,
"Quality").
with c = clamp(kappa * exp(rho), c_min, c_max), kappa set by the curvature scheduler and rho
(``log_c``) learned per layer, tau_h = softplus(beta_h) learned per head.

The attention itself is the ``hyperbolic_attention`` op (phase7fw/kernels/hyperbolic_attention/:
its torch reference, the Triton kernel that ``[kernels] hyperbolic_attention`` selects, and
their checks); this module holds the projections, RoPE (:mod:`.rotary`), the learned
curvature and temperatures, and the decode paths (:mod:`.cached`, :mod:`.static`).
"""

from __future__ import annotations

import math
from typing import Literal

import attrs
import torch
import torch.nn.functional as F
from torch import nn

from phase7fw.components.phase7 import cached, static
from phase7fw.components.phase7.rotary import RotaryEmbedding
from phase7fw.errors import Phase7Error
from phase7fw.hookspecs import hookimpl
from phase7fw.kernels.hyperbolic_attention import SCORES, geometry, hyperbolic_attention, sliding_window_mask
from phase7fw.recipe.options import non_negative, option, positive

__all__ = [
    "HyperbolicAttention",
    "HyperbolicAttentionConfig",
    "RotaryEmbedding",
    "SdpaAttention",
    "SdpaAttentionConfig",
    "build_hyperbolic_attention",
    "build_sdpa_attention",
]


# ---------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------


@attrs.frozen
class HyperbolicAttentionConfig:
    window: int = option(256, check=positive, help="keys per query (i-W < j <= i); >= seq_len: full causal")
    rope_theta: float = option(10000.0, check=positive, help="RoPE base")
    init_temperature: float = option(1.0, check=positive, help="initial tau = softplus(beta) of every head")
    c_min: float = option(1e-3, check=positive, help="lower clamp of the effective curvature")
    c_max: float = option(10.0, check=positive, help="upper clamp of the effective curvature")
    # Defaults measured in docs/model.md ("Quality"); checkpoints from before keep the legacy values.
    score: Literal["distance", "squared_distance", "dot_distance"] = option(
        "dot_distance", legacy="distance",
        help="s = -tau d (distance), -tau d^2 (squared_distance) or <q,k>/sqrt(D) - tau d (dot_distance)")
    qk_norm: bool = option(
        True, legacy=False, help="RMS-normalize q and k per head (learned gains) and map q/sqrt(D), k/sqrt(D) to the ball,"
        " so the exp-map does not saturate as |q| grows")


@attrs.frozen
class SdpaAttentionConfig:
    rope_theta: float = option(10000.0, check=positive, help="RoPE base")
    window: int = option(0, check=non_negative, help="keys per query (i-W < j <= i); 0: full causal")
    qk_norm: bool = option(False, help="RMS-normalize q and k per head (learned gains), as the hyperbolic default")


# ---------------------------------------------------------------------------------------
# Pure functions (references)
# ---------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------


def _inverse_softplus(y: float) -> float:
    return y + math.log(-math.expm1(-y))  # log(exp(y) - 1) without overflow


class _ProjectedAttention(nn.Module):
    """Shared parts: q/k/v/out projections (no bias), RoPE, head split/merge, and what the cost
    estimates read (:class:`phase7fw.interfaces.AttentionLayer`)."""

    attention_kind = "sdpa"
    window = 0  # keys per query; 0: every earlier token

    def _keys_seen(self, seq_len: int) -> int:
        return min(self.window or seq_len, seq_len)

    def attention_flops_per_token(self, seq_len: int) -> float:
        """Scores and values, forward and backward: 12 FLOPs per key seen, head and head dimension."""
        return 12 * self._keys_seen(seq_len) * self.n_heads * self.head_dim

    def attention_scores_per_token(self, seq_len: int) -> int:
        return self.n_heads * self._keys_seen(seq_len)

    def __init__(self, d_model: int, n_heads: int, seq_len: int, rope_theta: float, n_layers: int,
                 qk_norm: bool = False):
        super().__init__()
        if d_model % n_heads:
            raise Phase7Error(f"attention: d_model {d_model} is not divisible by n_heads {n_heads}")
        self.d_model, self.n_heads, self.head_dim = d_model, n_heads, d_model // n_heads
        self.n_layers = n_layers
        self.q_proj = nn.Linear(d_model, d_model, bias=False)
        self.k_proj = nn.Linear(d_model, d_model, bias=False)
        self.v_proj = nn.Linear(d_model, d_model, bias=False)
        self.o_proj = nn.Linear(d_model, d_model, bias=False)
        self.rope = RotaryEmbedding(self.head_dim, seq_len, rope_theta)
        self.q_norm = nn.Parameter(torch.ones(self.head_dim)) if qk_norm else None
        self.k_norm = nn.Parameter(torch.ones(self.head_dim)) if qk_norm else None

    def projected(self, x, projected=None):
        """q, k, v (B, H, T, D) before RoPE (q, k RMS-normalized when the module has ``q_norm``);
        the decode paths rotate q and k at their absolute positions. ``projected``: the outputs
        of :meth:`input_projections` on x, already computed (a block's fused decode step)."""
        B, T, _ = x.shape

        def heads(t):
            return t.reshape(B, T, self.n_heads, self.head_dim).transpose(1, 2)

        q, k, v = projected or (self.q_proj(x), self.k_proj(x), self.v_proj(x))
        q, k, v = heads(q), heads(k), heads(v)
        if self.q_norm is not None:
            q = F.rms_norm(q, (self.head_dim,), self.q_norm)
            k = F.rms_norm(k, (self.head_dim,), self.k_norm)
        return q, k, v

    def input_projections(self) -> list[nn.Linear]:
        """The linear maps of the block's normed input, in the order :meth:`projected` takes
        their outputs: a block may fuse them into one matmul for decoding."""
        return [self.q_proj, self.k_proj, self.v_proj]

    def _qkv(self, x):
        q, k, v = self.projected(x)
        return self.rope(q), self.rope(k), v

    def _out(self, o):
        B, H, T, D = o.shape
        return self.o_proj(o.transpose(1, 2).reshape(B, T, H * D))

    def _init_projections(self, qk_std: float) -> None:
        std = self.d_model**-0.5
        nn.init.normal_(self.q_proj.weight, std=qk_std)
        nn.init.normal_(self.k_proj.weight, std=qk_std)
        nn.init.normal_(self.v_proj.weight, std=std)
        # Residual branches add up over depth: shrink the output projection (GPT-2 style).
        nn.init.normal_(self.o_proj.weight, std=std / math.sqrt(2 * self.n_layers))
        self.rope.init_weights()
        with torch.no_grad():
            for gain in (self.q_norm, self.k_norm):
                if gain is not None:
                    gain.fill_(1.0)


class HyperbolicAttention(_ProjectedAttention):
    """Sliding-window attention scored by negative Poincare-ball distance (module docstring)."""

    attention_kind = "hyperbolic"

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        seq_len: int,
        *,
        window: int = 256,
        rope_theta: float = 10000.0,
        init_temperature: float = 1.0,
        c_min: float = 1e-3,
        c_max: float = 10.0,
        score: str = "dot_distance",
        qk_norm: bool = True,
        n_layers: int = 1,
    ):
        super().__init__(d_model, n_heads, seq_len, rope_theta, n_layers, qk_norm)
        if not 0 < c_min <= c_max:
            raise Phase7Error(f"attention: need 0 < c_min <= c_max, got c_min={c_min}, c_max={c_max}")
        self.window, self.c_min, self.c_max = window, c_min, c_max
        self.init_temperature = init_temperature
        if score not in SCORES:
            raise Phase7Error(f"attention: score must be one of {', '.join(SCORES)}; got {score!r}")
        self.score = score
        # rho: learned per-layer log-curvature. Shape (1,), not a 0-dim scalar: FSDP2 shards
        # parameters along dim 0 (checkpoints with the old 0-dim shape still load, see
        # phase7fw.core.checkpoint.upgrade_shapes).
        self.log_c = nn.Parameter(torch.zeros(1))
        self.beta = nn.Parameter(torch.full((n_heads,), _inverse_softplus(init_temperature)))
        # qk_norm: |q| ~ sqrt(D) like QK-norm dot-product attention; the ball sees q/sqrt(D).
        # d_c(exp(s q), exp(s k)) = s d_{c s^2}(exp(q), exp(k)), so the attention op gets
        # c s^2 and tau s (tau s^2 for d^2) (curvature(), temperature()) and needs no change.
        self.tangent_scale = self.head_dim**-0.5 if qk_norm else 1.0
        # kappa from the curvature scheduler: a buffer updated in place (fill_), so a compiled
        # graph reads it as data and does not recompile when it changes; not checkpointed
        # (the scheduler owns it).
        self._kappa = 1.0
        self.register_buffer("kappa", torch.ones((), dtype=torch.float32), persistent=False)
        #: the attention core; kernel selection may swap in a Triton implementation with
        #: the same signature as hyperbolic_attention_reference.
        self.attention_fn = hyperbolic_attention

    def set_curvature(self, kappa: float) -> None:
        self._kappa = float(kappa)
        with torch.no_grad():
            self.kappa.fill_(self._kappa)

    def layer_curvature(self) -> torch.Tensor:
        """The layer's curvature c = clamp(kappa * exp(log_c), c_min, c_max), 0-dim fp32."""
        return (self.kappa.float() * self.log_c.float().exp()).clamp(self.c_min, self.c_max).reshape(())

    def layer_temperature(self) -> torch.Tensor:
        """The layer's per-head tau = softplus(beta), fp32."""
        return F.softplus(self.beta.float())

    def curvature(self) -> torch.Tensor:
        """The curvature the op sees: c, times s^2 with ``qk_norm`` (tangent scale s)."""
        return self.layer_curvature() * self.tangent_scale**2

    def temperature(self) -> torch.Tensor:
        """The temperatures the op sees: tau, times s (tau d) or s^2 (tau d^2) with ``qk_norm``."""
        return self.layer_temperature() * self.tangent_scale ** (2 if self.score == "squared_distance" else 1)

    def init_weights(self) -> None:
        # q, k are tangent vectors: std 1/sqrt(d_model * head_dim) gives |q| ~ 1 for unit-RMS
        # inputs, so points start well inside the ball (sqrt(c)|q| ~ 1) rather than at the clamp.
        self._init_projections(qk_std=(self.d_model * self.head_dim) ** -0.5)
        with torch.no_grad():
            self.log_c.zero_()
            self.beta.fill_(_inverse_softplus(self.init_temperature))
            self.kappa.fill_(self._kappa)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self._qkv(x)
        o = self.attention_fn(q, k, v, self.curvature(), self.temperature(), self.window, score=self.score)
        return self._out(o)

    @torch.no_grad()
    def diagnostics(self, x: torch.Tensor, max_queries: int = 64) -> dict[str, float]:
        """Statistics of this layer on input x (B, T, d_model), for the ``diagnostics``
        callback: tangent norms of q and k before the exp-map, sqrt(c)|q| and the share of
        rows at the tangent clamp (exp-map saturation), the ball radius sqrt(c)|x| reached,
        curvature and temperature, and, over the last ``max_queries`` query rows, the softmax
        entropy (nats) and the score range within each row's window."""
        q, k, _ = self._qkv(x)
        c, tau = self.curvature(), self.temperature()
        sc = c.sqrt()
        nq, nk = q.float().norm(dim=-1), k.float().norm(dim=-1)
        aq = sc * nq
        T = q.shape[-2]
        rows = torch.arange(max(T - max_queries, 0), T, device=q.device)
        scores = cached.hyperbolic_scores(q[:, :, rows], k, c, tau, self.score)  # (B, H, R, T)
        mask = sliding_window_mask(rows, torch.arange(T, device=q.device), self.window)
        scores = scores.masked_fill(~mask, float("-inf"))
        logp = torch.log_softmax(scores, dim=-1)
        entropy = -(logp.exp() * logp.nan_to_num(neginf=0.0)).sum(-1)
        spread = scores.masked_fill(~mask, float("nan"))
        score_range = spread.nan_to_num(nan=-float("inf")).amax(-1) - spread.nan_to_num(nan=float("inf")).amin(-1)
        return {
            "q_norm": nq.mean().item(), "k_norm": nk.mean().item(),
            "sqrt_c_q_norm": aq.mean().item(),
            "saturated": (aq >= geometry.MAX_TANGENT_ATANH).float().mean().item(),
            "ball_radius": torch.tanh(aq.clamp_max(geometry.MAX_TANGENT_ATANH)).mean().item(),
            "curvature": self.layer_curvature().item(),  # the layer's own c and tau, not the op's
            "tau_mean": self.layer_temperature().mean().item(), "tau_max": self.layer_temperature().max().item(),
            "entropy": entropy.mean().item(), "score_range": score_range.mean().item(),
        }

    # -- cached decoding (phase7fw.inference.decoding): a ring buffer of the last W keys/values
    def init_cache(self, batch_size: int = 1):
        from phase7fw.components.caches import KVWindow

        return KVWindow(self.window)

    def forward_cached(self, x: torch.Tensor, cache, start: int) -> torch.Tensor:
        """``forward`` for tokens at positions start.. following those held in ``cache``."""
        return cached.hyperbolic_forward_cached(self, x, cache, start)

    # -- static one-token step (phase7fw.inference.decoding): the ring in fixed buffers
    def init_static_cache(self, cache):
        return static.StaticAttention(self, cache)

    def forward_static(self, x: torch.Tensor, state, pos: torch.Tensor, projected=None) -> torch.Tensor:
        return static.attention_step(self, x, state, pos, hyperbolic=True, projected=projected)

    def extra_repr(self) -> str:
        return (f"heads={self.n_heads}, head_dim={self.head_dim}, window={self.window}, score={self.score},"
                f" c in [{self.c_min}, {self.c_max}]")


class SdpaAttention(_ProjectedAttention):
    """Causal (optionally sliding-window) softmax(q k^T / sqrt(D)) v with RoPE."""

    def __init__(
        self, d_model: int, n_heads: int, seq_len: int, *, rope_theta: float = 10000.0, window: int = 0,
        n_layers: int = 1, qk_norm: bool = False,
    ):
        super().__init__(d_model, n_heads, seq_len, rope_theta, n_layers, qk_norm)
        self.window = window

    def init_weights(self) -> None:
        self._init_projections(qk_std=self.d_model**-0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self._qkv(x)
        q, k = q.to(v.dtype), k.to(v.dtype)  # RoPE output is fp32; SDPA wants one dtype
        T = q.shape[-2]
        if self.window == 0 or self.window >= T:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            pos = torch.arange(T, device=q.device)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=sliding_window_mask(pos, pos, self.window))
        return self._out(o)

    # -- cached decoding (phase7fw.inference.decoding): the last `window` keys/values, or all of them
    def init_cache(self, batch_size: int = 1):
        from phase7fw.components.caches import KVWindow

        return KVWindow(self.window or None)

    def forward_cached(self, x: torch.Tensor, cache, start: int) -> torch.Tensor:
        return cached.sdpa_forward_cached(self, x, cache, start)

    # -- static one-token step: needs a bounded window (a ring); window 0 keeps every key
    def supports_static(self) -> bool:
        return self.window > 0

    def init_static_cache(self, cache):
        return static.StaticAttention(self, cache)

    def forward_static(self, x: torch.Tensor, state, pos: torch.Tensor, projected=None) -> torch.Tensor:
        return static.attention_step(self, x, state, pos, hyperbolic=False, projected=projected)


# ---------------------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------------------


def build_hyperbolic_attention(config, *, d_model: int, n_heads: int, seq_len: int, layer_idx: int, **context):
    module = HyperbolicAttention(
        d_model,
        n_heads,
        seq_len,
        window=config.window,
        rope_theta=config.rope_theta,
        init_temperature=config.init_temperature,
        c_min=config.c_min,
        c_max=config.c_max,
        score=config.score,
        qk_norm=config.qk_norm,
        n_layers=context.get("n_layers", 1),
    )
    # [kernels] hyperbolic_attention: swap in the Triton core (same signature, no parameters).
    from phase7fw.kernels import select

    module.attention_fn = select(context, "hyperbolic_attention", module.attention_fn)
    return module


def build_sdpa_attention(config, *, d_model: int, n_heads: int, seq_len: int, layer_idx: int, **context):
    return SdpaAttention(
        d_model, n_heads, seq_len, rope_theta=config.rope_theta, window=config.window,
        n_layers=context.get("n_layers", 1), qk_norm=config.qk_norm,
    )


@hookimpl
def register_components(register):
    register(
        "attention",
        "hyperbolic",
        build_hyperbolic_attention,
        HyperbolicAttentionConfig,
        description="causal sliding-window attention scored by -tau * Poincare distance (learned curvature; score variants)",
    )
    register(
        "attention",
        "sdpa",
        build_sdpa_attention,
        SdpaAttentionConfig,
        description="causal softmax dot-product attention with RoPE (optional sliding window)",
    )
