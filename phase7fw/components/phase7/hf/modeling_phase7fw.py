"""The Phase 7 language model for Hugging Face transformers (written by ``phase7fw export``).

Self-contained: torch and transformers only, no phase7fw import, so an exported folder
works where phase7fw is not installed::

    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(FOLDER, trust_remote_code=True)

``config.json`` holds the recipe's ``[model]`` section under ``"phase7"`` (every option,
``vocab_size`` and ``ffn_hidden`` resolved) and ``"curvature"``, the curvature scale kappa
of the exported step. Parameter names are phase7fw's. The maths mirrors phase7fw's reference
implementations (fp32 distances, softmax statistics and SSM state): logits agree with
phase7fw's to ~1e-6 in fp32. An option this file does not implement is an error, never
silently ignored. Decoding recomputes the context each token (no cache here; phase7fw's own
``generate`` keeps O(1) state per token).
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

try:
    from transformers import PreTrainedConfig
except ImportError:  # transformers < 5
    from transformers import PretrainedConfig as PreTrainedConfig


class Phase7fwConfig(PreTrainedConfig):
    model_type = "phase7fw"
    attribute_map = {"hidden_size": "d_model", "num_hidden_layers": "n_layers", "num_attention_heads": "n_heads",
                     "max_position_embeddings": "seq_len"}

    def __init__(self, phase7=None, curvature=1.0, **kwargs):
        self.phase7 = dict(phase7 or {})
        self.curvature = float(curvature)
        p = self.phase7
        self.vocab_size = p.get("vocab_size", 0)
        self.d_model, self.n_layers = p.get("d_model", 0), p.get("n_layers", 0)
        self.n_heads, self.seq_len = p.get("n_heads", 1), p.get("seq_len", 0)
        kwargs.setdefault("tie_word_embeddings", False)  # a tied head is computed from the embedding
        super().__init__(**kwargs)


# Options of each part: those that change the forward pass, and those that only matter in
# training (init, loss penalties, the scan's chunking). Anything else is refused.
MODEL_OPTIONS = {"name", "d_model", "n_layers", "n_heads", "seq_len", "vocab_size", "ffn_hidden", "mixer",
                 "norm_eps", "tie_embeddings", "embedding", "attention", "ssm", "block"}
TRAINING_ONLY = {"init_std", "ffn_multiple_of", "init_temperature", "rank_penalty", "gate_init_bias", "chunk_size"}


def _options(kind: str, table: dict, known: set) -> dict:
    unknown = set(table) - known - TRAINING_ONLY - {"name"}
    if unknown:
        raise ValueError(f"{kind} {table.get('name', '')!r}: this modeling file does not implement the option(s)"
                         f" {sorted(unknown)}; export with the phase7fw version that trained the model")
    return table


# ----------------------------------------------------------------------------- shared parts
def rms_norm(x, weight, eps):
    dt = torch.promote_types(x.dtype, torch.float32)
    return F.rms_norm(x.to(dt), (x.size(-1),), weight.to(dt), eps).to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


class SwiGLU(nn.Module):
    def __init__(self, d_model, hidden):
        super().__init__()
        self.w13 = nn.Linear(d_model, 2 * hidden, bias=False)  # [gate | up]
        self.w2 = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x):
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


def rope(x, theta):
    """Rotate-half RoPE of x (B, H, T, D) at positions 0..T-1; angles from fp64 products, output fp32."""
    half, T = x.shape[-1] // 2, x.shape[-2]
    inv_freq = theta ** (-torch.arange(half, dtype=torch.float64, device=x.device) / half)
    angles = torch.arange(T, dtype=torch.float64, device=x.device).unsqueeze(-1) * inv_freq
    cos, sin = angles.cos().float(), angles.sin().float()
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def window_mask(T, window, device):
    """True where query i may attend key j: j <= i and i - j < window (window 0: no limit)."""
    i = torch.arange(T, device=device).unsqueeze(-1)
    j = torch.arange(T, device=device).unsqueeze(0)
    mask = j <= i
    return mask & (i - j < window) if window else mask


# ----------------------------------------------------------------------------- embeddings
class HTTEmbedding(nn.Module):
    """Tensor-train table: E[i, j] = scale * G_1[:, i_1, j_1, :] @ ... @ G_K[:, i_K, j_K, :] (mixed-radix
    digits of i and j, most significant first); cores (r_{k-1}, v_k, d_k, r_k)."""

    EQUATIONS = {2: "ixa,ajy->ijxy", 3: "ixa,ajyb,bkz->ijkxyz"}

    def __init__(self, opts, vocab_size, d_model):
        super().__init__()
        n, rank = opts["n_cores"], opts["rank"]
        self.vocab_size, self.d_model = vocab_size, d_model
        vf, df = balanced_factors(vocab_size, n), balanced_factors(d_model, n)
        ranks = [1] + [rank] * (n - 1) + [1]
        self.cores = nn.ParameterList(nn.Parameter(torch.zeros(ranks[k], vf[k], df[k], ranks[k + 1])) for k in range(n))
        self.scale = nn.Parameter(torch.ones(1))

    def weight_matrix(self):
        cores = list(self.cores)
        cores[0], cores[-1] = cores[0].squeeze(0), cores[-1].squeeze(-1)
        full = torch.einsum(self.EQUATIONS[len(cores)], *cores)
        rows = math.prod(c.shape[1] for c in self.cores)
        return full.reshape(rows, -1)[: self.vocab_size, : self.d_model] * self.scale

    def forward(self, ids):
        return F.embedding(ids, self.weight_matrix())


def balanced_factors(n, k):
    """k near-equal integers, largest first, whose product is >= n (phase7fw's factorization)."""
    factors, rest = [], n
    for left in range(k, 0, -1):
        f = max(1, int(round(rest ** (1.0 / left))))
        while f**left < rest:
            f += 1
        while f > 1 and (f - 1) ** left >= rest:
            f -= 1
        factors.append(f)
        rest = -(-rest // f)
    return sorted(factors, reverse=True)


class DenseEmbedding(nn.Module):
    def __init__(self, opts, vocab_size, d_model):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(vocab_size, d_model))

    def weight_matrix(self):
        return self.weight

    def forward(self, ids):
        return F.embedding(ids, self.weight)


EMBEDDINGS = {"htt": (HTTEmbedding, {"n_cores", "rank"}), "dense": (DenseEmbedding, set())}


# ----------------------------------------------------------------------------- attention
class _Projected(nn.Module):
    def __init__(self, d_model, n_heads, qk_norm=False):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, d_model // n_heads
        self.q_proj = nn.Linear(d_model, d_model, bias=False)
        self.k_proj = nn.Linear(d_model, d_model, bias=False)
        self.v_proj = nn.Linear(d_model, d_model, bias=False)
        self.o_proj = nn.Linear(d_model, d_model, bias=False)
        self.q_norm = nn.Parameter(torch.ones(self.head_dim)) if qk_norm else None
        self.k_norm = nn.Parameter(torch.ones(self.head_dim)) if qk_norm else None

    def qkv(self, x, theta):
        B, T, _ = x.shape

        def heads(t):
            return t.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)

        q, k = heads(self.q_proj(x)), heads(self.k_proj(x))
        if self.q_norm is not None:  # qk_norm: per-head RMS norm before RoPE
            q = F.rms_norm(q, (self.head_dim,), self.q_norm)
            k = F.rms_norm(k, (self.head_dim,), self.k_norm)
        return rope(q, theta), rope(k, theta), heads(self.v_proj(x))

    def out(self, o):
        B, H, T, D = o.shape
        return self.o_proj(o.transpose(1, 2).reshape(B, T, H * D))


MAX_TANGENT_ATANH = math.atanh(0.999)  # points no further out than radius 0.999 / sqrt(c)


def arcosh1p(z):
    """arcosh(1 + z) without forming 1 + z; z floored so the gradient stays finite."""
    z = z.clamp_min(torch.finfo(z.dtype).eps ** 2)
    return torch.log1p(z + torch.sqrt(z * (z + 2.0)))


def tangent_stats(u, c):
    """|u|, a = min(sqrt(c)|u|, max) and sinh(2a)/|u| of tangent vectors u (..., D)."""
    n = u.norm(dim=-1).clamp_min(1e-15)
    a = (c.sqrt() * n).clamp_max(MAX_TANGENT_ATANH)
    return n, a, torch.sinh(2.0 * a) / n


SCORES = ("distance", "squared_distance", "dot_distance")


class HyperbolicAttention(_Projected):
    """Scores from d = d_c(expmap0(q_i), expmap0(k_j)) on the Poincare ball of curvature -c: -tau_h d
    (``score = "distance"``, the default of exports without the option), -tau_h d^2 ("squared_distance")
    or <q_i, k_j> / sqrt(D) - tau_h d ("dot_distance"); causal sliding window; d from <q, k> and per-row
    scalars (1 - c|x|^2 never formed by subtraction). ``qk_norm``: q, k RMS-normalized per head and
    q / sqrt(D), k / sqrt(D) mapped to the ball, computed as s d_{c s^2}(expmap0(q), expmap0(k)), s = 1/sqrt(D)."""

    def __init__(self, opts, d_model, n_heads, curvature):
        qk_norm = opts.get("qk_norm", False)
        super().__init__(d_model, n_heads, qk_norm)
        self.window, self.theta = opts["window"], opts["rope_theta"]
        self.score = opts.get("score", "distance")
        if self.score not in SCORES:
            raise ValueError(f"attention score {self.score!r} is not implemented by this modeling file ({SCORES})")
        self.c_min, self.c_max, self.kappa = opts["c_min"], opts["c_max"], curvature
        self.log_c = nn.Parameter(torch.zeros(1))  # shape (1,) as in phase7fw (FSDP2 shards dim 0)
        self.beta = nn.Parameter(torch.zeros(n_heads))
        self.tangent_scale = self.head_dim**-0.5 if qk_norm else 1.0

    def forward(self, x):
        q, k, v = self.qkv(x, self.theta)
        out_dtype, T = v.dtype, x.shape[1]
        with torch.autocast(x.device.type, enabled=False):
            c = (self.kappa * self.log_c.float().exp()).clamp(self.c_min, self.c_max).reshape(())
            c = c * self.tangent_scale**2
            tau = F.softplus(self.beta.float()).view(-1, 1, 1)
            tau = tau * self.tangent_scale ** (2 if self.score == "squared_distance" else 1)
            v = v.float()
            nq, aq, fq = (s.unsqueeze(-1) for s in tangent_stats(q, c))
            nk, ak, fk = (s.unsqueeze(-2) for s in tangent_stats(k, c))
            dot = q @ k.transpose(-1, -2)
            gap = (nq * nk - dot).clamp_min(0.0)
            z = torch.sinh(aq - ak).pow(2) + 0.5 * fq * fk * gap
            d = arcosh1p(2.0 * z) / c.sqrt()
            if self.score == "distance":
                scores = -tau * d
            elif self.score == "squared_distance":
                scores = -tau * (d * d)
            else:
                scores = dot * self.head_dim**-0.5 - tau * d
            scores = scores.masked_fill(~window_mask(T, self.window, x.device), float("-inf"))
            o = torch.softmax(scores, dim=-1) @ v
        return self.out(o.to(out_dtype))


class SdpaAttention(_Projected):
    def __init__(self, opts, d_model, n_heads, curvature):
        super().__init__(d_model, n_heads, opts.get("qk_norm", False))
        self.window, self.theta = opts["window"], opts["rope_theta"]

    def forward(self, x):
        q, k, v = self.qkv(x, self.theta)
        q, k = q.to(v.dtype), k.to(v.dtype)
        T = q.shape[-2]
        if self.window == 0 or self.window >= T:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=window_mask(T, self.window, x.device))
        return self.out(o)


ATTENTIONS = {"hyperbolic": (HyperbolicAttention, {"window", "rope_theta", "c_min", "c_max", "score", "qk_norm"}),
              "sdpa": (SdpaAttention, {"window", "rope_theta", "qk_norm"})}


# ----------------------------------------------------------------------------- AR-SSM
def ssm_scan(x, B, C, log_decay, chunk):
    """y_t = C_t^T S_t, S_t = exp(log_decay_t) S_{t-1} + B_t x_t^T (x (b,h,T,dv), B, C (b,h,T,r),
    log_decay (b,h,T)), chunked: masked matmuls within chunks, the state carried between them. fp32."""
    b, h, T, dv = x.shape
    r = B.shape[-1]
    Q = min(chunk, T)
    n = -(-T // Q)
    pad = n * Q - T
    x, B, C, ld = x.float(), B.float(), C.float(), log_decay.float()
    if pad:
        x, B, C = (F.pad(t, (0, 0, 0, pad)) for t in (x, B, C))
        ld = F.pad(ld, (0, pad))
    x, B, C = x.reshape(b, h, n, Q, dv), B.reshape(b, h, n, Q, r), C.reshape(b, h, n, Q, r)
    cum = ld.reshape(b, h, n, Q).cumsum(-1)
    causal = torch.ones(Q, Q, dtype=torch.bool, device=x.device).tril()
    decay = (cum[..., :, None] - cum[..., None, :]).masked_fill(~causal, float("-inf")).exp()
    y = torch.einsum("bhnij,bhnjd->bhnid", torch.einsum("bhnir,bhnjr->bhnij", C, B) * decay, x)
    local = torch.einsum("bhnj,bhnjr,bhnjd->bhnrd", (cum[..., -1:] - cum).exp(), B, x)
    state, entering = x.new_zeros(b, h, r, dv), []
    for i in range(n):
        entering.append(state)
        state = cum[:, :, i, -1].exp()[..., None, None] * state + local[:, :, i]
    y = y + torch.einsum("bhnir,bhnrd->bhnid", C * cum.exp()[..., None], torch.stack(entering, dim=2))
    return y.reshape(b, h, n * Q, dv)[:, :, :T]


class ArSsm(nn.Module):
    """Adaptive-rank semiseparable SSM: causal depthwise conv, projections, rank gate, decayed state.
    ``discretize``: the state's input is Delta_t x_t; ``out_norm``: RMSNorm of the gated output before
    W_out (both off for exports without the options, as the models that wrote them)."""

    def __init__(self, opts, d_model):
        super().__init__()
        H, r, self.min_rank = opts["n_heads"], opts["max_rank"], opts["min_rank"]
        self.n_heads, self.max_rank, self.n_gated = H, r, r - self.min_rank
        self.d_model, self.d_inner = d_model, opts["expand"] * d_model
        self.head_dim, self.conv_size, self.chunk = self.d_inner // H, opts["conv_size"], opts["chunk_size"]
        self.conv_weight = nn.Parameter(torch.zeros(d_model, 1, self.conv_size))
        self.conv_bias = nn.Parameter(torch.zeros(d_model))
        self.sizes = (self.d_inner, H * r, H * r, H, H * self.n_gated)
        self.in_proj = nn.Linear(d_model, sum(self.sizes), bias=False)
        self.dt_bias = nn.Parameter(torch.zeros(H))
        self.A_log = nn.Parameter(torch.zeros(H))
        self.D = nn.Parameter(torch.zeros(H))
        self.gate_bias = nn.Parameter(torch.zeros(H * self.n_gated)) if self.n_gated else None
        self.z_proj = nn.Linear(d_model, self.d_inner, bias=False) if opts["output_gate"] else None
        self.discretize = bool(opts.get("discretize", False))
        self.norm_weight = nn.Parameter(torch.ones(self.d_inner)) if opts.get("out_norm", False) else None
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)

    def forward(self, u):
        b, t, _ = u.shape
        H, r, dv = self.n_heads, self.max_rank, self.head_dim
        up = F.conv1d(F.pad(u.transpose(1, 2), (self.conv_size - 1, 0)), self.conv_weight, self.conv_bias,
                      groups=self.d_model).transpose(1, 2)
        xs, Bs, Cs, dt, g_logits = self.in_proj(up).split(self.sizes, dim=-1)
        g = torch.ones(b, t, H, self.min_rank, device=u.device)
        if self.n_gated:
            gated = torch.sigmoid(g_logits.float().unflatten(-1, (H, self.n_gated))
                                  + self.gate_bias.float().view(H, self.n_gated))
            g = torch.cat([g, gated], dim=-1)
        Bs, Cs = Bs.unflatten(-1, (H, r)) * g, Cs.unflatten(-1, (H, r)) * g
        step = F.softplus(dt.float() + self.dt_bias.float())  # Delta
        log_decay = -step * self.A_log.float().exp()
        x = xs.unflatten(-1, (H, dv))
        x_in = x * step.unsqueeze(-1).to(x.dtype) if self.discretize else x
        y = ssm_scan(x_in.transpose(1, 2), Bs.transpose(1, 2), Cs.transpose(1, 2), log_decay.transpose(1, 2),
                     self.chunk).to(x.dtype).transpose(1, 2)
        y = (y + self.D.view(H, 1).to(x.dtype) * x).reshape(b, t, self.d_inner)
        if self.z_proj is not None:
            y = F.silu(self.z_proj(u)) * y
        if self.norm_weight is not None:
            y = F.rms_norm(y.float(), (self.d_inner,), self.norm_weight.float(), 1e-5).to(y.dtype)
        return self.out_proj(y)


SSMS = {"ar_ssm": (ArSsm, {"max_rank", "min_rank", "n_heads", "expand", "conv_size", "output_gate", "discretize",
                           "out_norm"}),
        "none": (None, set())}


# ----------------------------------------------------------------------------- model
class HybridBlock(nn.Module):
    """h = x + g * Attn(u) + (1 - g) * SSM(u), u = norm1(x), g = sigmoid(W_g u + b_g); out = h + FFN(norm2(h)).
    Block option ``mix``: "sum" joins the paths as Attn(u) + SSM(u); "alternate" keeps the SSM in even
    layers and the attention in odd ones. ``ssm_every`` k: the SSM path in layers 0, k, 2k, ... only."""

    def __init__(self, p, curvature, layer_idx):
        super().__init__()
        d, mixer = p["d_model"], p["mixer"]
        mix, every = p["block"].get("mix", "gate"), p["block"].get("ssm_every", 1)
        if mixer == "hybrid" and mix == "alternate":
            mixer = "ssm" if layer_idx % 2 == 0 else "attention"
        elif mixer == "hybrid" and layer_idx % every:
            mixer = "attention"
        self.norm1, self.norm2 = RMSNorm(d, p["norm_eps"]), RMSNorm(d, p["norm_eps"])
        self.attn = self.ssm = None
        if mixer in ("hybrid", "attention"):
            cls, known = ATTENTIONS[p["attention"]["name"]]
            self.attn = cls(_options("attention", p["attention"], known), d, p["n_heads"], curvature)
        if mixer in ("hybrid", "ssm"):
            cls, known = SSMS[p["ssm"]["name"]]
            self.ssm = cls(_options("ssm", p["ssm"], known), d) if cls is not None else None
        both = self.attn is not None and self.ssm is not None
        self.gate = nn.Linear(d, d, bias=True) if both and mix == "gate" else None
        self.ffn = SwiGLU(d, p["ffn_hidden"])

    def forward(self, x):
        u = self.norm1(x)
        if self.attn is None:
            mixed = self.ssm(u)
        elif self.ssm is None:
            mixed = self.attn(u)
        elif self.gate is None:
            mixed = self.attn(u) + self.ssm(u)
        else:
            g = torch.sigmoid(self.gate(u))
            mixed = g * self.attn(u) + (1 - g) * self.ssm(u)
        h = x + mixed
        return h + self.ffn(self.norm2(h))


BLOCKS = {"hybrid": (HybridBlock, {"mix", "ssm_every"})}


def _check_names(p):
    _options("model", p, MODEL_OPTIONS)
    for kind, table in (("embedding", EMBEDDINGS), ("attention", ATTENTIONS), ("ssm", SSMS), ("block", BLOCKS)):
        name = p[kind]["name"]
        if name not in table:
            raise ValueError(f"{kind} {name!r} is not implemented by this modeling file (it has {sorted(table)})")
    _options("block", p["block"], BLOCKS[p["block"]["name"]][1])


class Phase7fwPreTrainedModel(PreTrainedModel):
    config_class = Phase7fwConfig
    base_model_prefix = "phase7fw"
    _no_split_modules = ["HybridBlock"]

    def _init_weights(self, module):
        pass  # every weight comes from model.safetensors


class Phase7fwForCausalLM(Phase7fwPreTrainedModel, GenerationMixin):
    def __init__(self, config):
        super().__init__(config)
        p = config.phase7
        _check_names(p)
        cls, known = EMBEDDINGS[p["embedding"]["name"]]
        self.embedding = cls(_options("embedding", p["embedding"], known), p["vocab_size"], p["d_model"])
        self.blocks = nn.ModuleList(BLOCKS[p["block"]["name"]][0](p, config.curvature, i) for i in range(p["n_layers"]))
        self.norm = RMSNorm(p["d_model"], p["norm_eps"])
        self.head = None if p["tie_embeddings"] else nn.Linear(p["d_model"], p["vocab_size"], bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.embedding

    def forward(self, input_ids=None, attention_mask=None, labels=None, return_dict=None, **kwargs):
        if attention_mask is not None:
            m = attention_mask.long()
            if bool((m[:, 1:] > m[:, :-1]).any()):  # a 0 before a 1: left or inner padding
                raise ValueError("left padding is not supported: the SSM state and the attention window would"
                                 " read the padding; run one sequence at a time or pad on the right")
        x = self.embedding(input_ids).float()  # fp32 residual stream, as in phase7fw
        for block in self.blocks:
            x = block(x)
        head = self.head.weight if self.head is not None else self.embedding.weight_matrix()
        logits = F.linear(self.norm(x), head)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutput(loss=loss, logits=logits)

    # Generation recomputes the whole context for every token: no cache object.
    @classmethod
    def _supports_default_dynamic_cache(cls):
        return False

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        return {"input_ids": input_ids, "attention_mask": attention_mask}
