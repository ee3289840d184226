"""The ``llama`` baseline: a plain pre-norm decoder (RMSNorm, RoPE, causal SDPA, SwiGLU).

It is the reference the Phase 7 model is measured against (PERFORMANCE.md, P1), so it is
kept plain and fast: fused QKV and gate/up projections, SDPA for attention, no dropout.

The model is built without touching data (``with torch.device("meta")`` works); every
parameter and buffer gets its value in :meth:`LlamaModel.init_weights`.
"""

# No ``from __future__ import annotations`` here: the recipe converter reads the real field
# types of the config class.

import math

import attrs
import torch
import torch.nn.functional as F
from torch import nn

from phase7fw.components.checkpointing import BlockCheckpointing
from phase7fw.errors import Phase7Error
from phase7fw.hookspecs import hookimpl
from phase7fw.kernels.rmsnorm import rmsnorm
from phase7fw.kernels.swiglu import swiglu
from phase7fw.interfaces import LanguageModel
from phase7fw.recipe.options import non_negative, option, positive


@attrs.frozen
class LlamaConfig:
    d_model: int = option(512, check=positive, help="hidden width")
    n_layers: int = option(8, check=positive, help="transformer blocks")
    n_heads: int = option(8, check=positive, help="query heads (d_model must divide by it)")
    n_kv_heads: int = option(0, check=non_negative, help="key/value heads for GQA; 0 = n_heads")
    seq_len: int = option(1024, check=positive, help="longest sequence (RoPE table length)")
    vocab_size: int = option(0, check=non_negative, help="0 = the tokenizer's vocabulary size")
    ffn_hidden: int = option(0, check=non_negative, help="SwiGLU width; 0 = 8/3 d_model rounded up")
    ffn_multiple_of: int = option(256, check=positive, help="rounding of the automatic ffn_hidden")
    rope_theta: float = option(10000.0, check=positive, help="RoPE base frequency")
    tie_embeddings: bool = option(False, help="share the embedding table with the LM head")
    norm_eps: float = option(1e-5, check=positive, help="RMSNorm epsilon")
    init_std: float = option(0.02, check=positive, help="std of the normal weight init")


def resolve_ffn_hidden(config: LlamaConfig) -> int:
    if config.ffn_hidden:
        return config.ffn_hidden
    m = config.ffn_multiple_of
    return m * math.ceil(8 * config.d_model / 3 / m)


def kernel_impls(context: dict) -> tuple:
    """(rmsnorm, swiglu) implementations chosen by ``[kernels]`` in a factory's context."""
    from phase7fw.kernels import select

    return select(context, "rmsnorm", rmsnorm), select(context, "swiglu", swiglu)


class RMSNorm(nn.Module):
    """x / rms(x) * weight (the ``rmsnorm`` op, phase7fw/kernels/rmsnorm/). ``impl`` swaps in a kernel with the
    same signature; it is a plain attribute (``norm_impl``), so parameters do not change."""

    def __init__(self, dim: int, eps: float, impl=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))
        self.norm_impl = impl or rmsnorm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm_impl(x, self.weight, self.eps)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


def rope_tables(seq_len: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotation angles, (seq_len, head_dim // 2), fp32.

    Angles are computed in fp64: at large positions fp32 products lose the low bits.
    """
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[i], x[i + D/2]) of x (B, H, T, D) by the angles of positions 0..T-1.

    The half-split pairing needs no strided access; it is the same rotation as the
    interleaved form up to a fixed permutation of the head channels.
    """
    dt = torch.promote_types(x.dtype, torch.float32)
    x1, x2 = x.to(dt).chunk(2, dim=-1)
    out = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.to(x.dtype)


class Attention(nn.Module):
    attention_kind = "sdpa"  # phase7fw.interfaces.AttentionLayer

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int):
        super().__init__()
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.head_dim = d_model // n_heads
        # One matmul for q, k and v: fewer, larger GEMMs.
        self.wqkv = nn.Linear(d_model, (n_heads + 2 * n_kv_heads) * self.head_dim, bias=False)
        self.wo = nn.Linear(n_heads * self.head_dim, d_model, bias=False)

    def attention_flops_per_token(self, seq_len: int) -> float:
        """Scores and values over every earlier token, forward and backward."""
        return 12 * seq_len * self.n_heads * self.head_dim

    def attention_scores_per_token(self, seq_len: int) -> int:
        """SDPA's fused backends (flash, cuDNN, memory-efficient; flash on the CPU) keep one
        log-sum-exp per query and head for the backward, never the T x T scores: counting
        the scores made the run header's plan for llama_1.5b at B = 8 83.8 GiB, and the
        preflight refused it on an 80 GB H100, where it peaks at 37.5 GiB."""
        return self.n_heads

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        hd = self.head_dim
        q, k, v = self.wqkv(x).split([self.n_heads * hd, self.n_kv_heads * hd, self.n_kv_heads * hd], dim=-1)
        q = q.view(B, T, self.n_heads, hd).transpose(1, 2)
        k = k.view(B, T, self.n_kv_heads, hd).transpose(1, 2)
        v = v.view(B, T, self.n_kv_heads, hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        gqa = self.n_kv_heads != self.n_heads
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        return self.wo(y.transpose(1, 2).reshape(B, T, self.n_heads * hd))

    def forward_cached(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv) -> torch.Tensor:
        """``forward`` for new tokens (RoPE angles cos/sin) after those held in ``kv``
        (a :class:`phase7fw.inference.decoding.KVWindow`), which receives their keys and values."""
        from phase7fw.components.caches import causal_sdpa_with_prefix

        B, T, _ = x.shape
        hd = self.head_dim
        q, k, v = self.wqkv(x).split([self.n_heads * hd, self.n_kv_heads * hd, self.n_kv_heads * hd], dim=-1)
        q = apply_rope(q.view(B, T, self.n_heads, hd).transpose(1, 2), cos, sin)
        k = apply_rope(k.view(B, T, self.n_kv_heads, hd).transpose(1, 2), cos, sin)
        kv.append(k, v.view(B, T, self.n_kv_heads, hd).transpose(1, 2))
        k_all, v_all = kv.view()
        y = causal_sdpa_with_prefix(q, k_all, v_all, enable_gqa=self.n_kv_heads != self.n_heads)
        return self.wo(y.transpose(1, 2).reshape(B, T, self.n_heads * hd))

    def forward_static(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ring, pos: torch.Tensor):
        """``forward_cached`` of one token at position ``pos`` (a device tensor) over a
        :class:`phase7fw.components.caches.StaticRing` of seq_len slots (unfilled ones masked)."""
        B, hd = x.shape[0], self.head_dim
        q, k, v = self.wqkv(x).split([self.n_heads * hd, self.n_kv_heads * hd, self.n_kv_heads * hd], dim=-1)
        q = apply_rope(q.view(B, 1, self.n_heads, hd).transpose(1, 2), cos, sin)
        k = apply_rope(k.view(B, 1, self.n_kv_heads, hd).transpose(1, 2), cos, sin)
        ring.write(k, v.view(B, 1, self.n_kv_heads, hd).transpose(1, 2), pos)
        y = F.scaled_dot_product_attention(q, ring.k, ring.v, attn_mask=ring.mask(pos),
                                           enable_gqa=self.n_kv_heads != self.n_heads)
        return self.wo(y.transpose(1, 2).reshape(B, 1, self.n_heads * hd))


class SwiGLU(nn.Module):
    """w2(silu(gate) * up) with [gate, up] = w13(x); ``impl`` (attribute ``glu_impl``) is the
    elementwise part, the ``swiglu`` op (phase7fw/kernels/swiglu/) or a kernel with its signature."""

    def __init__(self, d_model: int, hidden: int, impl=None):
        super().__init__()
        self.hidden = hidden
        self.w13 = nn.Linear(d_model, 2 * hidden, bias=False)  # gate and up, one matmul
        self.w2 = nn.Linear(hidden, d_model, bias=False)
        self.glu_impl = impl or swiglu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(self.glu_impl(gate, up))


class Block(nn.Module):
    def __init__(self, config: LlamaConfig, n_kv_heads: int, ffn_hidden: int, norm_impl=None, glu_impl=None):
        super().__init__()
        self.attn_norm = RMSNorm(config.d_model, config.norm_eps, norm_impl)
        self.attn = Attention(config.d_model, config.n_heads, n_kv_heads)
        self.ffn_norm = RMSNorm(config.d_model, config.norm_eps, norm_impl)
        self.ffn = SwiGLU(config.d_model, ffn_hidden, glu_impl)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        h = x + self.attn(self.attn_norm(x), cos, sin)
        return h + self.ffn(self.ffn_norm(h))

    def forward_cached(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv) -> torch.Tensor:
        h = x + self.attn.forward_cached(self.attn_norm(x), cos, sin, kv)
        return h + self.ffn(self.ffn_norm(h))

    def forward_static(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ring, pos: torch.Tensor):
        h = x + self.attn.forward_static(self.attn_norm(x), cos, sin, ring, pos)
        return h + self.ffn(self.ffn_norm(h))


class LlamaModel(LanguageModel):
    def __init__(self, config: LlamaConfig, vocab_size: int, *, kernels: dict | None = None, registry=None):
        super().__init__()
        if config.d_model % config.n_heads:
            raise Phase7Error(f"model.d_model ({config.d_model}) must be divisible by model.n_heads ({config.n_heads})")
        n_kv = config.n_kv_heads or config.n_heads
        if config.n_heads % n_kv:
            raise Phase7Error(f"model.n_heads ({config.n_heads}) must be divisible by model.n_kv_heads ({n_kv})")
        head_dim = config.d_model // config.n_heads
        if head_dim % 2:
            raise Phase7Error(f"RoPE needs an even head size; d_model / n_heads = {head_dim}")
        self.config = config
        self.vocab_size = vocab_size
        self.seq_len = config.seq_len
        self.d_model, self.ffn_width = config.d_model, resolve_ffn_hidden(config)
        self.head_dim = head_dim
        self.checkpointing: BlockCheckpointing | None = None

        self.tok_embeddings = nn.Embedding(vocab_size, config.d_model)
        ffn_hidden = resolve_ffn_hidden(config)
        # [kernels] rmsnorm / swiglu: swap in the Triton ops (same signatures, no parameters)
        norm_impl, glu_impl = kernel_impls({"kernels": kernels, "registry": registry})
        self.blocks = nn.ModuleList(Block(config, n_kv, ffn_hidden, norm_impl, glu_impl) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, config.norm_eps, norm_impl)
        self.output = None if config.tie_embeddings else nn.Linear(config.d_model, vocab_size, bias=False)
        # Filled by init_weights; not saved (derived from the config).
        self.register_buffer("rope_cos", torch.empty(config.seq_len, head_dim // 2), persistent=False)
        self.register_buffer("rope_sin", torch.empty(config.seq_len, head_dim // 2), persistent=False)
        if self.tok_embeddings.weight.device.type != "meta":
            self.init_weights()  # a model built on a real device is usable at once

    # -- init -------------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self) -> None:
        """Normal(0, init_std) weights, residual output projections scaled by 1/sqrt(2 L)
        (keeps the residual stream's variance flat in depth), norms at 1, RoPE tables.
        Draws from torch's global RNG in a fixed order, so a seed fixes the result."""
        std = self.config.init_std
        out_std = std / math.sqrt(2 * self.config.n_layers)
        nn.init.normal_(self.tok_embeddings.weight, std=std)
        for block in self.blocks:
            block.attn_norm.reset_parameters()
            block.ffn_norm.reset_parameters()
            nn.init.normal_(block.attn.wqkv.weight, std=std)
            nn.init.normal_(block.attn.wo.weight, std=out_std)
            nn.init.normal_(block.ffn.w13.weight, std=std)
            nn.init.normal_(block.ffn.w2.weight, std=out_std)
        self.norm.reset_parameters()
        if self.output is not None:
            nn.init.normal_(self.output.weight, std=std)
        cos, sin = rope_tables(self.seq_len, self.head_dim, self.config.rope_theta)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)

    def enable_activation_checkpointing(self, policy: str = "full", every: int = 1) -> None:
        """Recompute blocks in backward instead of storing their activations
        (phase7fw/components/checkpointing.py: the policy, every N-th block)."""
        self.checkpointing = BlockCheckpointing(policy, every).attach(self.blocks)

    # -- forward ----------------------------------------------------------------------------
    def forward_hidden(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Final normed hidden states (B, T, D): the LM head input (for chunked losses)."""
        T = input_ids.size(1)
        if T > self.seq_len:
            raise ValueError(f"sequence of {T} tokens is longer than model.seq_len = {self.seq_len}")
        # fp32 tables even if the model was cast to bf16: apply_rope rotates in fp32.
        cos, sin = self.rope_cos[:T].float(), self.rope_sin[:T].float()
        h = self.tok_embeddings(input_ids)
        for block in self.blocks:
            h = block(h, cos, sin)
        return self.norm(h)

    def lm_head_weight(self) -> torch.Tensor:
        """The (vocab, d_model) output projection (the embedding table when tied)."""
        return self.tok_embeddings.weight if self.output is None else self.output.weight

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        if self.output is not None:
            return self.output(h)  # through the module, so hooks/FSDP wrapping see it
        return F.linear(h, self.tok_embeddings.weight)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.logits(self.forward_hidden(input_ids))

    # -- cached decoding (phase7fw.inference.decoding) ---------------------------------------------------
    @property
    def context_limit(self) -> int:
        """RoPE tables and training stop at seq_len; longer contexts slide (see decoding.py)."""
        return self.seq_len

    def init_cache(self, batch_size: int = 1):
        from phase7fw.components.caches import DecodeCache, KVWindow

        return DecodeCache([KVWindow(self.seq_len) for _ in self.blocks])

    def forward_cached(self, input_ids: torch.Tensor, cache) -> torch.Tensor:
        """Logits (B, T, vocab) of T new tokens following the ``cache.pos`` cached ones."""
        pos, T = cache.pos, input_ids.size(1)
        if pos + T > self.seq_len:
            raise ValueError(f"cached context of {pos + T} tokens is longer than model.seq_len = {self.seq_len}")
        cos, sin = self.rope_cos[pos : pos + T].float(), self.rope_sin[pos : pos + T].float()
        h = self.tok_embeddings(input_ids)
        for block, kv in zip(self.blocks, cache.layers):
            h = block.forward_cached(h, cos, sin, kv)
        cache.pos += T
        return self.logits(self.norm(h))

    # -- static one-token step (phase7fw.inference.decoding): what a CUDA graph captures
    def init_static_cache(self, cache):
        from phase7fw.components.caches import StaticCache, StaticRing

        return StaticCache([StaticRing(kv) for kv in cache.layers], cache, self.vocab_size, self.rope_cos.device)

    def forward_static(self, static) -> None:
        """``forward_cached`` of ``static.token`` at ``static.pos`` (< seq_len: the decoder's
        context rule rebuilds the cache before the position reaches seq_len)."""
        at = static.pos.view(1)
        cos, sin = self.rope_cos.index_select(0, at).float(), self.rope_sin.index_select(0, at).float()
        h = self.tok_embeddings(static.token)
        for block, ring in zip(self.blocks, static.layers):
            h = block.forward_static(h, cos, sin, ring, static.pos)
        static.logits.copy_(self.logits(self.norm(h))[:, -1])
        static.pos.add_(1)

    # -- accounting -------------------------------------------------------------------------
    def parameter_breakdown(self) -> dict[str, int]:
        def count(modules) -> int:
            return sum(p.numel() for m in modules for p in m.parameters())

        parts = {
            "embedding": count([self.tok_embeddings]),
            "attention": count(b.attn for b in self.blocks),
            "ffn": count(b.ffn for b in self.blocks),
            "norms": count([self.norm, *(n for b in self.blocks for n in (b.attn_norm, b.ffn_norm))]),
            "head": 0 if self.output is None else count([self.output]),
        }
        parts["total"] = sum(parts.values())
        return parts

    # -- Hugging Face (phase7fw export / import-hf): a native LlamaForCausalLM, no custom code
    def hf_export(self):
        """transformers' Llama layout: the fused qkv and gate/up matrices are split into
        q/k/v_proj and gate/up_proj. RoPE needs no permutation: both rotate the two halves
        of the head (rotate-half), and the scores are the same softmax(q k^T / sqrt(d))."""
        from phase7fw.interfaces import HFModel

        c, hd = self.config, self.head_dim
        n_kv = c.n_kv_heads or c.n_heads
        config = {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": self.vocab_size,
            "hidden_size": c.d_model, "intermediate_size": resolve_ffn_hidden(c), "num_hidden_layers": c.n_layers,
            "num_attention_heads": c.n_heads, "num_key_value_heads": n_kv, "head_dim": hd, "hidden_act": "silu",
            "max_position_embeddings": c.seq_len, "rms_norm_eps": c.norm_eps, "initializer_range": c.init_std,
            "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
            "rope_theta": c.rope_theta,  # the key transformers 4.x reads
            "tie_word_embeddings": c.tie_embeddings, "attention_bias": False, "mlp_bias": False,
        }
        t = {"model.embed_tokens.weight": self.tok_embeddings.weight, "model.norm.weight": self.norm.weight}
        for i, b in enumerate(self.blocks):
            pre = f"model.layers.{i}."
            q, k, v = b.attn.wqkv.weight.split([c.n_heads * hd, n_kv * hd, n_kv * hd])
            gate, up = b.ffn.w13.weight.chunk(2)
            t.update({pre + "self_attn.q_proj.weight": q, pre + "self_attn.k_proj.weight": k,
                      pre + "self_attn.v_proj.weight": v, pre + "self_attn.o_proj.weight": b.attn.wo.weight,
                      pre + "mlp.gate_proj.weight": gate, pre + "mlp.up_proj.weight": up,
                      pre + "mlp.down_proj.weight": b.ffn.w2.weight,
                      pre + "input_layernorm.weight": b.attn_norm.weight,
                      pre + "post_attention_layernorm.weight": b.ffn_norm.weight})
        if self.output is not None:
            t["lm_head.weight"] = self.output.weight
        return HFModel(config, t, generation={"use_cache": True})

    def hf_import(self, tensors: dict, config: dict) -> dict:
        def take(name):
            if name not in tensors:
                raise Phase7Error(f"the exported llama has no tensor {name!r}")
            return tensors[name]

        state = {"tok_embeddings.weight": take("model.embed_tokens.weight"), "norm.weight": take("model.norm.weight")}
        for i in range(len(self.blocks)):
            pre = f"model.layers.{i}."
            state.update({
                f"blocks.{i}.attn.wqkv.weight": torch.cat([take(pre + f"self_attn.{p}_proj.weight") for p in "qkv"]),
                f"blocks.{i}.attn.wo.weight": take(pre + "self_attn.o_proj.weight"),
                f"blocks.{i}.ffn.w13.weight": torch.cat([take(pre + "mlp.gate_proj.weight"),
                                                         take(pre + "mlp.up_proj.weight")]),
                f"blocks.{i}.ffn.w2.weight": take(pre + "mlp.down_proj.weight"),
                f"blocks.{i}.attn_norm.weight": take(pre + "input_layernorm.weight"),
                f"blocks.{i}.ffn_norm.weight": take(pre + "post_attention_layernorm.weight"),
            })
        if self.output is not None:
            state["output.weight"] = take("lm_head.weight")
        return state

    def matmul_params(self) -> int:
        """Attention + FFN + LM head; the embedding lookup is not a matmul, but a tied
        table is used once as the head matmul, so it counts once either way."""
        parts = self.parameter_breakdown()
        return parts["attention"] + parts["ffn"] + self.lm_head_weight().numel()


def build_llama(config: LlamaConfig, *, vocab_size: int | None = None, **context) -> LlamaModel:
    """Factory of the ``llama`` model; ``vocab_size`` comes from the tokenizer when the
    recipe leaves ``model.vocab_size`` at 0; ``kernels`` and ``registry`` pick the rmsnorm and
    swiglu implementations. Other context keys are not used."""
    tokenizer_vocab = vocab_size or 0
    vocab = config.vocab_size or tokenizer_vocab
    if vocab <= 0:
        raise Phase7Error("model.vocab_size is 0 and no tokenizer vocabulary size was given")
    if config.vocab_size and tokenizer_vocab > config.vocab_size:
        raise Phase7Error(
            f"model.vocab_size = {config.vocab_size} is smaller than the tokenizer's vocabulary"
            f" ({tokenizer_vocab}); set it to 0 to use the tokenizer's size"
        )
    model = LlamaModel(config, vocab, kernels=context.get("kernels"), registry=context.get("registry"))
    # [kernels] cross_entropy: the fused Triton head + loss, or None (LanguageModel.cross_entropy)
    from phase7fw.kernels import select

    model.cross_entropy_fn = select(context, "cross_entropy", None)
    return model


@hookimpl
def register_components(register):
    register(
        "model",
        "llama",
        build_llama,
        LlamaConfig,
        description="baseline decoder: RMSNorm, RoPE, causal SDPA (GQA), SwiGLU; context: vocab_size, kernels, registry",
    )
