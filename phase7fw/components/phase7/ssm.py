"""The adaptive-rank semiseparable SSM mixer (``ssm = "ar_ssm"``) and ``ssm = "none"``.

Per SSM head h (MODEL.md), with u the mixer input (B, T, d_model):

    u'  = causal depthwise conv(u)                  left padding only: u'_t reads u_{t-K+1..t}
    x_t = W_x u'_t                                  (d_v per head; d_inner = expand * d_model)
    g_t = [1]*min_rank ++ sigmoid(W_g u'_t + b_g)   rank gate in (0, 1]^r, r = max_rank
    B_t = (W_B u'_t) * g_t,  C_t = (W_C u'_t) * g_t
    Delta_t = softplus(W_dt u'_t + dt_bias),  lambda_t = exp(-Delta_t * exp(A_log))  in (0, 1)
    S_t = lambda_t S_{t-1} + Delta_t B_t x_t^T       (r x d_v, fp32; ``discretize``, else B_t x_t^T)
    y_t = C_t^T S_t + D * x_t
    out = W_out norm(silu(W_z u) * y)                output gate (``output_gate``), RMSNorm (``out_norm``)

``discretize`` scales each input by its step Delta_t (Mamba's discretization): the state then
stays O(1/a) whatever the decay, so slow heads do not drown fast ones. ``out_norm`` (Mamba-2's
gated RMSNorm) gives the path an O(1) output whatever the state's scale. With ``init_std = 0``
the projections start with unit-variance outputs (std 1/sqrt(fan_in)). The first design had
neither option and std 0.02 everywhere: its output was ~100x smaller than the attention path's
at init (docs/model.md, "Quality"), which the model never recovered from.

The factory is called as ``factory(config, *, d_model, seq_len, layer_idx, **context)``;
optional context ``n_layers`` (or ``parent.n_layers``) scales the output projection's init
by 1/sqrt(2 * n_layers) like the other residual branches. ``forward(x)`` returns
``(y, gate_mean)``; the model adds ``module.rank_penalty * gate_mean`` to the loss and logs the
effective rank ``gate_mean * module.max_rank``.

``none`` builds nothing: its factory returns ``None`` and the model then builds an
attention-only block (no SSM path, no mixing gate).

The scan is the ``ar_ssm_scan`` op (phase7fw/kernels/ar_ssm_scan/: the chunked torch
reference, the plain recurrence used as the test oracle, the Triton kernel that ``[kernels]
ar_ssm_scan`` selects by replacing ``module.scan_impl``, and their checks); the convolution is the
``causal_conv`` op (phase7fw/kernels/causal_conv/, ``module.conv_impl``).
"""

from __future__ import annotations

import math

import attrs
import torch
import torch.nn.functional as F
from torch import nn

from phase7fw.errors import Phase7Error
from phase7fw.hookspecs import hookimpl
from phase7fw.kernels.ar_ssm_scan import ar_ssm_scan
from phase7fw.kernels.causal_conv import causal_conv
from phase7fw.recipe.options import non_negative, option, positive


# ----------------------------------------------------------------------------- config
def _validate_ranks(kind: str, max_rank: int, min_rank: int) -> None:
    if min_rank > max_rank:
        raise Phase7Error(
            f"ssm {kind}: min_rank ({min_rank}) must be <= max_rank ({max_rank}); the first"
            f" min_rank of the max_rank state channels are always open"
        )


@attrs.frozen
class ArSsmConfig:
    max_rank: int = option(16, check=positive, help="state rank r per head (state is r x head_dim)")
    min_rank: int = option(4, check=non_negative, help="rank channels that are always open (<= max_rank)")
    n_heads: int = option(8, check=positive, help="SSM heads; must divide expand * d_model")
    expand: int = option(1, check=positive, help="d_inner = expand * d_model")
    conv_size: int = option(4, check=positive, help="kernel of the causal depthwise conv (left padded)")
    chunk_size: int = option(64, check=positive, help="chunk length of the chunked scan")
    rank_penalty: float = option(1e-3, check=non_negative, help="loss weight of mean(rank gate)")
    output_gate: bool = option(True, help="multiply the SSM output by silu(W_z u) before W_out")
    discretize: bool = option(True, legacy=False, help="scale the state's input by the step Delta_t (S += Delta B x^T)")
    out_norm: bool = option(True, legacy=False, help="RMSNorm (learned gain) on the gated output before W_out")
    init_std: float = option(
        0.0, check=non_negative, help="std of the projection weights at init; 0 = 1/sqrt(fan_in) (unit-variance outputs)")

    def __attrs_post_init__(self):
        _validate_ranks("ar_ssm", self.max_rank, self.min_rank)


@attrs.frozen
class NoSsmConfig:
    pass


# ----------------------------------------------------------------------------- module
# dt = softplus(dt_bias) starts log-uniform in [DT_MIN, DT_MAX] and a = exp(A_log) uniform in
# [A_MIN, A_MAX], so per-step decays span exp(-0.001) (memory ~1000 tokens) to exp(-1.6).
DT_MIN, DT_MAX = 1e-3, 1e-1
A_MIN, A_MAX = 1.0, 16.0
GATE_BIAS_INIT = 1.0  # gated channels start mostly open (sigmoid(1) ~ 0.73); the penalty closes them


class ArSsm(nn.Module):
    """Adaptive-rank semiseparable SSM mixer; see the module docstring for the equations."""

    def __init__(
        self,
        d_model: int,
        *,
        max_rank: int = 16,
        min_rank: int = 4,
        n_heads: int = 8,
        expand: int = 1,
        conv_size: int = 4,
        chunk_size: int = 64,
        rank_penalty: float = 1e-3,
        output_gate: bool = True,
        discretize: bool = False,
        out_norm: bool = False,
        init_std: float = 0.02,
        out_init_std: float | None = None,
        layer_idx: int = 0,
    ):
        super().__init__()
        _validate_ranks("ar_ssm", max_rank, min_rank)
        d_inner = expand * d_model
        if d_inner % n_heads:
            raise Phase7Error(
                f"ssm ar_ssm: n_heads ({n_heads}) must divide d_inner = expand * d_model = {d_inner}"
            )
        self.d_model, self.d_inner, self.n_heads = d_model, d_inner, n_heads
        self.head_dim = d_inner // n_heads
        self.max_rank, self.min_rank = max_rank, min_rank
        self.n_gated = max_rank - min_rank
        self.conv_size, self.chunk_size = conv_size, chunk_size
        self.rank_penalty = rank_penalty
        self.init_std = init_std or d_model**-0.5
        self.out_init_std = out_init_std or (init_std or d_inner**-0.5)
        self.discretize = discretize
        self.layer_idx = layer_idx
        self.output_gate = output_gate
        #: The scan (x, B, C, log_decay, chunk_size) -> y; kernel selection may swap it.
        self.scan_impl = ar_ssm_scan
        self.conv_impl = causal_conv

        H, r = n_heads, max_rank
        self.conv_weight = nn.Parameter(torch.empty(d_model, 1, conv_size))
        self.conv_bias = nn.Parameter(torch.empty(d_model))
        # One projection of u' into [x | B | C | dt | gate logits].
        self.proj_sizes = (d_inner, H * r, H * r, H, H * self.n_gated)
        self.in_proj = nn.Linear(d_model, sum(self.proj_sizes), bias=False)
        self.dt_bias = nn.Parameter(torch.empty(H))
        self.A_log = nn.Parameter(torch.empty(H))
        self.D = nn.Parameter(torch.empty(H))
        # Forced-open channels get no gate parameters (they would receive no gradient).
        self.gate_bias = nn.Parameter(torch.empty(H * self.n_gated)) if self.n_gated else None
        self.z_proj = nn.Linear(d_model, d_inner, bias=False) if output_gate else None
        self.norm_weight = nn.Parameter(torch.empty(d_inner)) if out_norm else None
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)

    def init_weights(self) -> None:
        H = self.n_heads
        with torch.no_grad():
            bound = 1.0 / math.sqrt(self.conv_size)  # nn.Conv1d's default for a depthwise conv
            self.conv_weight.uniform_(-bound, bound)
            self.conv_bias.uniform_(-bound, bound)
            self.in_proj.weight.normal_(0.0, self.init_std)
            if self.z_proj is not None:
                self.z_proj.weight.normal_(0.0, self.init_std)
            self.out_proj.weight.normal_(0.0, self.out_init_std)
            if self.norm_weight is not None:
                self.norm_weight.fill_(1.0)
            dt = torch.empty(H).uniform_(math.log(DT_MIN), math.log(DT_MAX)).exp()
            self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus^{-1}(dt)
            self.A_log.copy_(torch.empty(H).uniform_(A_MIN, A_MAX).log())
            self.D.fill_(1.0)
            if self.gate_bias is not None:
                self.gate_bias.fill_(GATE_BIAS_INIT)

    def causal_conv(self, u: torch.Tensor) -> torch.Tensor:
        """Depthwise conv over time with K-1 zeros on the left only: out_t uses u_{t-K+1..t}."""
        return self.conv_impl(u, self.conv_weight, self.conv_bias)

    def rank_gate(self, logits: torch.Tensor | None, shape) -> torch.Tensor:
        """g (b, t, H, r) in fp32: min_rank ones, then sigmoid of the gate logits."""
        ones = torch.ones(*shape, self.min_rank, device=self.D.device, dtype=torch.float32)
        if logits is None:
            return ones
        logits = logits.float().unflatten(-1, (self.n_heads, self.n_gated))
        gated = torch.sigmoid(logits + self.gate_bias.float().view(self.n_heads, self.n_gated))
        return torch.cat([ones, gated], dim=-1)

    def project(self, up: torch.Tensor):
        """The scan's inputs from conv outputs up (b, t, d): ``(x, x_in, B, C, log_decay, g)``
        with x (b, t, H, dv) for the D skip, x_in = the state's input (Delta x with
        ``discretize``), B, C (b, H, t, r), x_in (b, H, t, dv), log_decay (b, H, t) heads
        first, and the rank gate g (b, t, H, r). Shared by the training, cached and static paths."""
        b, t, _ = up.shape
        H, r, dv = self.n_heads, self.max_rank, self.head_dim
        xs, Bs, Cs, dt, g_logits = self.in_proj(up).split(self.proj_sizes, dim=-1)
        g = self.rank_gate(g_logits if self.n_gated else None, (b, t, H))  # (b, t, H, r)
        Bs = Bs.unflatten(-1, (H, r)) * g
        Cs = Cs.unflatten(-1, (H, r)) * g
        # log lambda = -Delta * a <= 0, in fp32 (small decays matter over long spans).
        step = F.softplus(dt.float() + self.dt_bias.float())  # Delta (b, t, H)
        log_decay = -step * self.A_log.float().exp()
        x = xs.unflatten(-1, (H, dv))
        x_in = (x * step.unsqueeze(-1).to(x.dtype)) if self.discretize else x
        return x, x_in.transpose(1, 2), Bs.transpose(1, 2), Cs.transpose(1, 2), log_decay.transpose(1, 2), g

    def input_projections(self) -> list[nn.Linear]:
        """The linear maps of the mixer input u itself (the output gate's; the others read the
        convolved input), in the order :meth:`output` takes their outputs: a block may fuse
        them with its other projections of u for decoding."""
        return [] if self.z_proj is None else [self.z_proj]

    def output(self, u: torch.Tensor, x: torch.Tensor, y: torch.Tensor, projected=None) -> torch.Tensor:
        """The mixer output (b, t, d_model) from the scan's y (b, H, t, dv), the skip input x
        (b, t, H, dv) and the mixer input u (for the output gate; ``projected``: the outputs of
        :meth:`input_projections` on u, already computed)."""
        b, t, _ = u.shape
        y = y.transpose(1, 2) + self.D.view(self.n_heads, 1).to(x.dtype) * x
        y = y.reshape(b, t, self.d_inner)
        if self.z_proj is not None:
            y = F.silu(projected[0] if projected else self.z_proj(u)) * y
        if self.norm_weight is not None:
            y = F.rms_norm(y.float(), (self.d_inner,), self.norm_weight.float(), 1e-5).to(y.dtype)
        return self.out_proj(y)

    def scan_flops_per_token(self) -> float:
        """The recurrence's state update and read-out, 2 r d_inner FLOPs each, forward and 2x
        backward (the projections are counted as matmul parameters)."""
        return 12 * self.max_rank * self.d_inner

    def forward(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, x_in, B, C, log_decay, g = self.project(self.causal_conv(u))
        y = self.scan_impl(x_in, B, C, log_decay, self.chunk_size)  # (b, H, t, dv)
        return self.output(u, x, y), g.mean()

    @torch.no_grad()
    def diagnostics(self, u: torch.Tensor) -> dict[str, float]:
        """Statistics on input u (B, T, d_model) for the ``diagnostics`` callback: the
        effective rank (mean number of open state channels), the median decay half-life in
        tokens (ln 2 / -log lambda_t), and the output's RMS."""
        _, _, _, _, log_decay, g = self.project(self.causal_conv(u))
        half_life = math.log(2.0) / (-log_decay).clamp_min(1e-12)
        y, _ = self(u)
        return {"effective_rank": g.sum(-1).mean().item(), "half_life": half_life.median().item(),
                "out_rms": y.float().pow(2).mean().sqrt().item()}

    # -- cached decoding (phase7fw.inference.decoding): conv tail + fp32 state, O(1) per token
    def init_cache(self, batch_size: int = 1):
        from phase7fw.components.phase7.cached import SsmCache

        return SsmCache()

    def forward_cached(self, u: torch.Tensor, cache) -> torch.Tensor:
        """``forward(u)[0]`` for tokens following those summarized in ``cache``."""
        from phase7fw.components.phase7.cached import ssm_forward_cached

        return ssm_forward_cached(self, u, cache)

    # -- static one-token step (phase7fw.inference.decoding): conv tail + state updated in place
    def init_static_cache(self, cache):
        from phase7fw.components.phase7.static import StaticSsm

        return StaticSsm(cache)

    def forward_static(self, u: torch.Tensor, static, pos: torch.Tensor, projected=None) -> torch.Tensor:
        from phase7fw.components.phase7.static import ssm_static_step

        return ssm_static_step(self, u, static, projected)

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, d_inner={self.d_inner}, n_heads={self.n_heads},"
            f" rank={self.min_rank}..{self.max_rank}, conv={self.conv_size}, chunk={self.chunk_size},"
            f" discretize={self.discretize}, out_norm={self.norm_weight is not None}"
        )


# ----------------------------------------------------------------------------- factories
def build_ar_ssm(config: ArSsmConfig, *, d_model: int, seq_len: int, layer_idx: int, **context) -> ArSsm:
    n_layers = context.get("n_layers") or getattr(context.get("parent"), "n_layers", None)
    d_inner = config.expand * d_model
    out_std = config.init_std or d_inner**-0.5  # 0: unit-variance outputs
    if n_layers:  # residual branch: shrink with depth like the other output projections
        out_std /= math.sqrt(2 * n_layers)
    module = ArSsm(
        d_model,
        max_rank=config.max_rank,
        min_rank=config.min_rank,
        n_heads=config.n_heads,
        expand=config.expand,
        conv_size=config.conv_size,
        chunk_size=config.chunk_size,
        rank_penalty=config.rank_penalty,
        output_gate=config.output_gate,
        discretize=config.discretize,
        out_norm=config.out_norm,
        init_std=config.init_std,
        out_init_std=out_std,
        layer_idx=layer_idx,
    )
    module.seq_len = seq_len
    # [kernels] ar_ssm_scan / causal_conv: swap in the Triton ops (same signatures, no parameters).
    from phase7fw.kernels import select

    module.scan_impl = select(context, "ar_ssm_scan", module.scan_impl)
    module.conv_impl = select(context, "causal_conv", module.conv_impl)
    return module


def build_none(config: NoSsmConfig, **context) -> None:
    return None


@hookimpl
def register_components(register):
    register(
        "ssm",
        "ar_ssm",
        build_ar_ssm,
        ArSsmConfig,
        description="adaptive-rank semiseparable SSM (chunked scan, fp32 state);"
        " context: d_model, seq_len, layer_idx[, n_layers]; forward -> (y, gate_mean)",
    )
    register(
        "ssm",
        "none",
        build_none,
        NoSsmConfig,
        description="no SSM path: the factory returns None and the model builds attention-only blocks",
    )
