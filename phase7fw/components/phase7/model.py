"""The ``phase7`` model: HTT embedding, gated hybrid blocks, RMSNorm, dense LM head.

Block (MODEL.md), pre-norm::

    h   = x + Mixer(norm1(x))
    out = h + FFN(norm2(h))                       # SwiGLU
    Mixer(u) = g * Attn(u) + (1 - g) * SSM(u)     # g = sigmoid(W_g u + b_g), per token and channel

``model.mixer = "attention"`` or ``"ssm"`` keeps one path (ablations). The embedding, the
attention, the SSM and the block itself are components chosen by name in the recipe
(``[model.embedding]``, ``[model.attention]``, ``[model.ssm]``, ``[model.block]``).
"""

# No ``from __future__ import annotations``: the recipe converter reads the field types.

import math
from typing import Literal

import attrs
import torch
import torch.nn.functional as F
from torch import nn

from phase7fw.components.checkpointing import BlockCheckpointing
from phase7fw.components.llama import RMSNorm, SwiGLU, kernel_impls
from phase7fw.components.llama import resolve_ffn_hidden as ffn_width  # same ffn_hidden rule
from phase7fw.errors import Phase7Error
from phase7fw.hookspecs import hookimpl
from phase7fw.interfaces import LanguageModel
from phase7fw.recipe.options import Component, component, non_negative, option, positive


@attrs.frozen
class Phase7Config:
    d_model: int = option(256, check=positive, help="hidden width")
    n_layers: int = option(4, check=positive, help="hybrid blocks")
    n_heads: int = option(4, check=positive, help="attention heads")
    seq_len: int = option(256, check=positive, help="training sequence length")
    vocab_size: int = option(0, check=non_negative, help="0 = the tokenizer's vocabulary size")
    ffn_hidden: int = option(0, check=non_negative, help="SwiGLU width; 0 = 8/3 d_model rounded up")
    ffn_multiple_of: int = option(256, check=positive, help="rounding of the automatic ffn_hidden")
    mixer: Literal["hybrid", "attention", "ssm"] = option("hybrid", help="which sequence mixers a block has")
    norm_eps: float = option(1e-5, check=positive, help="RMSNorm epsilon")
    init_std: float = option(0.02, check=positive, help="std of the normal weight init")
    tie_embeddings: bool = option(False, help="LM head = the embedding table (rebuilt from HTT cores once per step)")
    embedding: Component = component("embedding", {"name": "htt"}, help="token embedding")
    attention: Component = component("attention", {"name": "hyperbolic"}, help="local attention path")
    ssm: Component = component("ssm", {"name": "ar_ssm"}, help="global state-space path")
    block: Component = component("block", {"name": "hybrid"}, help="block layout")


@attrs.frozen
class HybridBlockConfig:
    # 2: the quality benchmark's best (docs/model.md, "Quality": -3.0% against 0, three seeds)
    gate_init_bias: float = option(2.0, help="b_g at init: the mix starts at g = sigmoid(b_g) on the attention path"
                                   " (2: 0.88; 0: 0.5 each)")
    mix: Literal["gate", "sum", "alternate"] = option(
        "gate", help="how a hybrid block joins its paths: gate = g*Attn + (1-g)*SSM with a learned "
        "per-channel gate; sum = Attn + SSM; alternate = SSM in even layers, attention in odd ones")
    ssm_every: int = option(1, check=positive, help="the SSM path in every k-th block (layers 0, k, 2k, ...), "
                            "attention only in the others; 1 = every block (gate / sum)")


def block_mixer(mixer: str, mix: str, ssm_every: int, layer_idx: int) -> str:
    """The paths of block ``layer_idx``: "hybrid", "attention" or "ssm" (the exported modeling
    file repeats this rule, standalone)."""
    if mixer != "hybrid":
        return mixer
    if mix == "alternate":  # Samba-style interleaving, no gate
        return "ssm" if layer_idx % 2 == 0 else "attention"
    return "hybrid" if layer_idx % ssm_every == 0 else "attention"


class HybridBlock(nn.Module):
    """One Phase 7 block. ``forward(x) -> (x, gate_mean)`` (gate_mean: the SSM rank gate's
    mean, 0 when there is no SSM), so the model can add the rank penalty to the loss."""

    def __init__(self, config: HybridBlockConfig, model_config: Phase7Config, layer_idx: int, registry, kernels):
        super().__init__()
        mc = model_config
        self.gate_init_bias = config.gate_init_bias
        self.init_std = mc.init_std
        self.n_layers = mc.n_layers
        ctx = dict(d_model=mc.d_model, n_heads=mc.n_heads, seq_len=mc.seq_len, layer_idx=layer_idx,
                   n_layers=mc.n_layers, parent=mc, registry=registry, kernels=kernels)
        norm_impl, glu_impl = kernel_impls(ctx)  # [kernels] rmsnorm / swiglu
        self.norm1 = RMSNorm(mc.d_model, mc.norm_eps, norm_impl)
        self.norm2 = RMSNorm(mc.d_model, mc.norm_eps, norm_impl)
        self.attn = None
        self.ssm = None
        if config.ssm_every != 1 and (mc.mixer != "hybrid" or config.mix == "alternate"):
            raise Phase7Error(f"model.block.ssm_every = {config.ssm_every} needs model.mixer = \"hybrid\" with"
                              f" model.block.mix = \"gate\" or \"sum\" (got mixer {mc.mixer!r}, mix"
                              f" {config.mix!r}); set ssm_every = 1")
        mixer = block_mixer(mc.mixer, config.mix, config.ssm_every, layer_idx)
        if mixer in ("hybrid", "attention"):
            self.attn = registry.build("attention", mc.attention.name, mc.attention.config, **ctx)
        if mixer in ("hybrid", "ssm"):
            self.ssm = registry.build("ssm", mc.ssm.name, mc.ssm.config, **ctx)  # may be None ("none")
        if self.attn is None and self.ssm is None:
            raise Phase7Error(f"model.mixer = {mc.mixer!r} with ssm 'none' leaves a block without a sequence mixer")
        both = self.attn is not None and self.ssm is not None
        self.gate = nn.Linear(mc.d_model, mc.d_model, bias=True) if both and config.mix == "gate" else None
        self.ffn = SwiGLU(mc.d_model, ffn_width(mc), glu_impl)
        self.fused_input = None  # (weight, bias, sizes) of fuse_input_projections, for decoding

    def init_weights(self) -> None:
        self.norm1.reset_parameters()
        self.norm2.reset_parameters()
        for part in (self.attn, self.ssm):
            if part is not None:
                part.init_weights()
        if self.gate is not None:
            nn.init.normal_(self.gate.weight, std=self.init_std)
            nn.init.constant_(self.gate.bias, self.gate_init_bias)
        nn.init.normal_(self.ffn.w13.weight, std=self.init_std)
        nn.init.normal_(self.ffn.w2.weight, std=self.init_std / math.sqrt(2 * self.n_layers))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        u = self.norm1(x)
        s, gate_mean = (None, x.new_zeros((), dtype=torch.float32)) if self.ssm is None else self.ssm(u)
        a = None if self.attn is None else self.attn(u)
        return self._mix_and_ffn(x, u, a, s), gate_mean

    @torch.no_grad()
    def diagnostics(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """``(forward(x)[0], stats)``: the mixer gate's mean (the attention path's share), the
        RMS of each path's output and each path's own statistics (``attn.*``, ``ssm.*``)."""
        u = self.norm1(x)
        stats: dict[str, float] = {}
        for name, part in (("attn", self.attn), ("ssm", self.ssm)):
            if part is not None and callable(getattr(part, "diagnostics", None)):
                stats.update({f"{name}.{k}": v for k, v in part.diagnostics(u).items()})
        if self.attn is not None:
            stats["attn.out_rms"] = self.attn(u).float().pow(2).mean().sqrt().item()
        if self.gate is not None:
            stats["gate_mean"] = torch.sigmoid(self.gate(u)).float().mean().item()
        return self(x)[0], stats

    # -- cached decoding (phase7fw.inference.decoding): each path keeps its own cache
    def supports_cache(self) -> bool:
        return all(callable(getattr(p, "forward_cached", None)) for p in (self.attn, self.ssm) if p is not None)

    def init_cache(self, batch_size: int = 1) -> dict:
        return {name: None if part is None else part.init_cache(batch_size)
                for name, part in (("attn", self.attn), ("ssm", self.ssm))}

    def forward_cached(self, x: torch.Tensor, cache: dict, start: int) -> torch.Tensor:
        """``forward(x)[0]`` for tokens at positions start.. following the cached ones."""
        u = self.norm1(x)
        s = None if self.ssm is None else self.ssm.forward_cached(u, cache["ssm"])
        a = None if self.attn is None else self.attn.forward_cached(u, cache["attn"], start)
        return self._mix_and_ffn(x, u, a, s)

    def _mix_and_ffn(self, x, u, a, s, gate_logits=None):
        if a is None:
            mixed = s
        elif s is None:
            mixed = a
        elif self.gate is None:  # mix = "sum"
            mixed = a + s
        else:
            g = torch.sigmoid(self.gate(u) if gate_logits is None else gate_logits)
            mixed = g * a + (1 - g) * s
        h = x + mixed
        return h + self.ffn(self.norm2(h))

    # -- static one-token step (phase7fw.inference.decoding)
    def supports_static_decode(self) -> bool:
        parts = [p for p in (self.attn, self.ssm) if p is not None]
        return all(callable(getattr(p, "forward_static", None)) and getattr(p, "supports_static", lambda: True)()
                   for p in parts)

    def init_static_cache(self, cache: dict) -> dict:
        return {name: None if part is None else part.init_static_cache(cache[name])
                for name, part in (("attn", self.attn), ("ssm", self.ssm))}

    def forward_static(self, x: torch.Tensor, static: dict, pos: torch.Tensor) -> torch.Tensor:
        """``forward_cached`` of one token at position ``pos`` (a device tensor); after
        :meth:`fuse_input_projections`, with one matmul for every projection of the normed input."""
        u = self.norm1(x)
        by_part: dict[str, list[torch.Tensor]] = {}
        if self.fused_input is not None:
            weight, bias, sizes = self.fused_input
            # int8 decoding (phase7fw.inference.int8) puts its module in place of the fused weight
            fused = weight(u) if callable(weight) else F.linear(u, weight, bias)
            for (name, _), out in zip(sizes, fused.split([n for _, n in sizes], dim=-1)):
                by_part.setdefault(name, []).append(out)

        def path(name, part):  # a path whose projections were fused gets their outputs
            if part is None:
                return None
            if name in by_part:
                return part.forward_static(u, static[name], pos, by_part[name])
            return part.forward_static(u, static[name], pos)  # unfused, or a plugin's path: as before

        s, a = path("ssm", self.ssm), path("attn", self.attn)
        return self._mix_and_ffn(x, u, a, s, by_part.get("gate", [None])[0])

    def fuse_input_projections(self) -> bool:
        """For decoding: store the projections of the normed input (the attention's q, k, v, the
        SSM's output gate, the mixer gate: each path's ``input_projections()``) as slices of one
        weight, so the static step runs one matmul where it ran up to five (each launch costs
        time at batch 1). The parameters become views of the fused weight, so in-place updates
        (load_state_dict, an optimizer step) reach it; moving or casting the module undoes the
        fusion (:meth:`_apply`). Returns whether it fused (two or more projections of one dtype)."""
        parts = [(name, part.input_projections()) for name, part in (("attn", self.attn), ("ssm", self.ssm))
                 if part is not None and callable(getattr(part, "input_projections", None))]
        linears = [(name, lin) for name, group in parts for lin in group]
        linears += [("gate", self.gate)] if self.gate is not None else []
        if len(linears) < 2 or len({(lin.weight.dtype, lin.weight.device) for _, lin in linears}) > 1:
            return False
        with torch.no_grad():
            weight = torch.cat([lin.weight for _, lin in linears])
            bias = torch.cat([lin.bias if lin.bias is not None else lin.weight.new_zeros(lin.out_features)
                              for _, lin in linears])
            start = 0
            for _, lin in linears:
                end = start + lin.out_features
                lin.weight.data = weight[start:end]
                if lin.bias is not None:
                    lin.bias.data = bias[start:end]
                start = end
        self.fused_input = (weight, bias, [(name, lin.out_features) for name, lin in linears])
        return True

    def _apply(self, fn, *args, **kwargs):
        self.fused_input = None  # .to() / .half() give the parameters new storage: no longer views
        return super()._apply(fn, *args, **kwargs)


class Phase7Model(LanguageModel):
    def __init__(self, config: Phase7Config, vocab_size: int, registry, kernels):
        super().__init__()
        self.config = config
        self.vocab_size, self.seq_len = vocab_size, config.seq_len
        self.d_model, self.ffn_width = config.d_model, ffn_width(config)
        self.embedding = registry.build("embedding", config.embedding.name, config.embedding.config,
                                        vocab_size=vocab_size, d_model=config.d_model, registry=registry,
                                        kernels=kernels, parent=config)
        self.blocks = nn.ModuleList(
            registry.build("block", config.block.name, config.block.config, model_config=config, layer_idx=i,
                           registry=registry, kernels=kernels)
            for i in range(config.n_layers)
        )
        self.norm = RMSNorm(config.d_model, config.norm_eps, kernel_impls({"kernels": kernels, "registry": registry})[0])
        self.checkpointing: BlockCheckpointing | None = None
        self.head = None
        if config.tie_embeddings:
            # The table E rebuilt from the embedding's factors is held in this buffer for a
            # whole optimizer step: every micro-batch adds its gradient to the buffer, and
            # finish_backward() pushes the sum through the factors once (MODEL.md: E is
            # rebuilt once per step, never per micro-batch).
            self.register_buffer("tied_table", torch.empty(vocab_size, config.d_model), persistent=False)
            self._step_table = False
        else:
            self.head = nn.Linear(config.d_model, vocab_size, bias=False)

    # ---------------------------------------------------------------- LanguageModel API
    def init_weights(self) -> None:
        self.embedding.init_weights()
        for block in self.blocks:
            block.init_weights()
        self.norm.reset_parameters()
        if self.head is not None:
            nn.init.normal_(self.head.weight, std=self.config.init_std)

    def enable_activation_checkpointing(self, policy: str = "full", every: int = 1) -> None:
        self.checkpointing = BlockCheckpointing(policy, every).attach(self.blocks)

    def check_strategy(self, strategy: str) -> None:
        if strategy == "fsdp" and self.head is None:
            # The tied table is rebuilt from the factors once per step, outside forward, where
            # FSDP2 holds them sharded (and would not reduce-scatter their gradient).
            raise Phase7Error("model.tie_embeddings = true with parallel.strategy = \"fsdp\": not supported (the"
                              " tied table is rebuilt outside forward, where FSDP keeps the embedding sharded);"
                              " use parallel.strategy = \"ddp\" or model.tie_embeddings = false")

    def set_curvature(self, kappa: float) -> None:
        for block in self.blocks:
            attn = getattr(block, "attn", None)
            if attn is not None and hasattr(attn, "set_curvature"):
                attn.set_curvature(kappa)

    def forward_hidden(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x = self.embedding(input_ids).float()  # fp32 residual stream, also with bf16 weights
        gate_means = []
        for block in self.blocks:
            x, gm = block(x)
            gate_means.append(gm)
        return self.norm(x), gate_means

    @torch.no_grad()
    def diagnostics(self, input_ids: torch.Tensor) -> dict[str, float]:
        """Per-layer statistics (``L{i}.<name>``) on one batch, for the ``diagnostics``
        callback; what each name means is in docs/model.md ("Diagnostics")."""
        x = self.embedding(input_ids).float()
        stats = {"embedding_rms": x.pow(2).mean().sqrt().item()}
        for i, block in enumerate(self.blocks):
            x, block_stats = block.diagnostics(x)
            stats.update({f"L{i}.{k}": v for k, v in block_stats.items()})
        return stats

    def begin_step(self) -> None:
        if self.head is None:
            with torch.no_grad():
                self.tied_table.copy_(self.embedding.weight_matrix())
            self.tied_table.requires_grad_(True)
            self.tied_table.grad = None
            self._step_table = True

    def finish_backward(self, reduce=None) -> None:
        if self.head is None and self._step_table:
            grad = self.tied_table.grad
            if grad is not None:
                grad = reduce(grad) if reduce is not None else grad
                table = self.embedding.weight_matrix()
                if table.requires_grad:  # not when the embedding is frozen (train.freeze)
                    table.backward(grad.to(self.tied_table.dtype))
            self.tied_table.grad = None
            self.tied_table.requires_grad_(False)
            self._step_table = False

    def lm_head_weight(self) -> torch.Tensor:
        if self.head is not None:
            return self.head.weight
        if self._step_table and torch.is_grad_enabled():
            return self.tied_table
        return self.embedding.weight_matrix()  # outside a training step: built on the spot

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.lm_head_weight())

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.logits(self.forward_hidden(input_ids)[0])

    # -- cached decoding (phase7fw.inference.decoding): O(1) per token in the context length
    context_limit = None  # windowed attention + recurrent SSM state: no length limit

    def supports_cache(self) -> bool:
        return all(callable(getattr(b, "supports_cache", None)) and b.supports_cache() for b in self.blocks)

    def init_cache(self, batch_size: int = 1):
        from phase7fw.components.caches import DecodeCache

        return DecodeCache([block.init_cache(batch_size) for block in self.blocks])

    def forward_cached(self, input_ids: torch.Tensor, cache) -> torch.Tensor:
        """Logits (B, T, vocab) of T new tokens following the ``cache.pos`` cached ones."""
        x = self.embedding(input_ids).float()
        for block, layer in zip(self.blocks, cache.layers):
            x = block.forward_cached(x, layer, cache.pos)
        cache.pos += input_ids.shape[1]
        if "head" not in cache.extra:  # a tied table is rebuilt once per cache, not per token
            cache.extra["head"] = self.lm_head_weight()
        return F.linear(self.norm(x), cache.extra["head"])

    # -- static one-token step (phase7fw.inference.decoding): what a CUDA graph captures
    def supports_static_decode(self) -> bool:
        return self.supports_cache() and all(
            callable(getattr(b, "supports_static_decode", None)) and b.supports_static_decode() for b in self.blocks)

    def init_static_cache(self, cache):
        from phase7fw.components.caches import StaticCache

        if "head" not in cache.extra:
            cache.extra["head"] = self.lm_head_weight()
        layers = [block.init_static_cache(layer) for block, layer in zip(self.blocks, cache.layers)]
        return StaticCache(layers, cache, self.vocab_size, cache.extra["head"].device,
                           extra={"head": cache.extra["head"]})

    def forward_static(self, static) -> None:
        """``forward_cached`` of ``static.token`` at ``static.pos``: logits into ``static.logits``."""
        x = self.embedding(static.token).float()
        for block, layer in zip(self.blocks, static.layers):
            x = block.forward_static(x, layer, static.pos)
        static.logits.copy_(F.linear(self.norm(x), static.extra["head"])[:, -1])
        static.pos.add_(1)

    def loss(self, input_ids: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, dict]:
        hidden, gate_means = self.forward_hidden(input_ids)
        ce = self.cross_entropy(hidden, targets)  # [kernels] cross_entropy / train.ce_chunk_tokens
        penalty = ce.new_zeros(())
        ranks = []
        for block, gm in zip(self.blocks, gate_means):
            ssm = getattr(block, "ssm", None)
            if ssm is not None:
                penalty = penalty + ssm.rank_penalty * gm
                ranks.append(gm.detach() * ssm.max_rank)
        metrics = {"ce_loss": ce.detach()}
        if ranks:
            metrics["rank_penalty"] = penalty.detach()
            metrics["effective_rank"] = torch.stack(ranks).mean()
        return ce + penalty, metrics

    def parameter_breakdown(self) -> dict[str, int]:
        def count(modules):
            return sum(p.numel() for m in modules if m is not None for p in m.parameters())

        parts = {
            "embedding": count([self.embedding]),
            "attention": count([b.attn for b in self.blocks]),
            "ssm": count([b.ssm for b in self.blocks]),
            "mixer_gate": count([b.gate for b in self.blocks]),
            "ffn": count([b.ffn for b in self.blocks]),
            "norms": count([self.norm] + [n for b in self.blocks for n in (b.norm1, b.norm2)]),
            "head": count([self.head]),  # 0 when tied to the embedding
        }
        parts["total"] = sum(p.numel() for p in self.parameters())
        return parts

    def matmul_params(self) -> int:
        emb = sum(p.numel() for p in self.embedding.parameters())
        head = self.vocab_size * self.config.d_model if self.head is None else 0  # tied: a V x D matmul
        return sum(p.numel() for p in self.parameters() if p.dim() >= 2) - emb + head

    # -- Hugging Face (phase7fw export / import-hf): hf/modeling_phase7fw.py, torch only
    def hf_export(self):
        """Parameter names unchanged; config.json gets the whole [model] section (vocab_size and
        ffn_hidden resolved) under "phase7" and the current curvature scale kappa; the folder
        gets hf/modeling_phase7fw.py, which refuses options it does not implement."""
        from importlib.resources import files

        from phase7fw.interfaces import HFModel
        from phase7fw.recipe.options import to_raw

        section = {"name": "phase7", **to_raw(self.config), "vocab_size": self.vocab_size,
                   "ffn_hidden": ffn_width(self.config)}
        kappa = next((float(b.attn._kappa) for b in self.blocks if hasattr(b.attn, "_kappa")), 1.0)
        code = files("phase7fw.components.phase7").joinpath("hf", "modeling_phase7fw.py").read_text(encoding="utf-8")
        config = {
            "architectures": ["Phase7fwForCausalLM"], "model_type": "phase7fw",
            "auto_map": {"AutoConfig": "modeling_phase7fw.Phase7fwConfig",
                         "AutoModelForCausalLM": "modeling_phase7fw.Phase7fwForCausalLM"},
            "phase7": section, "curvature": kappa, "tie_word_embeddings": False,
        }
        return HFModel(config, dict(self.state_dict()), files={"modeling_phase7fw.py": code},
                       generation={"use_cache": False})

    def hf_import(self, tensors: dict, config: dict) -> dict:
        return dict(tensors)  # the same names (the engine checks them against the model)

    def describe_extra(self) -> list[str]:
        ratio = getattr(self.embedding, "compression_ratio", None)
        lines = []
        if callable(ratio):
            dense = self.vocab_size * self.config.d_model
            lines.append(f"embedding {self.config.embedding.name}: compression {ratio():.1f}x"
                         f" vs a dense {self.vocab_size} x {self.config.d_model} table ({dense:,} parameters)")
        mc = self.config
        lines.append(f"blocks: {mc.n_layers} x {mc.block.name} (mixer {mc.mixer}: attention {mc.attention.name},"
                     f" ssm {mc.ssm.name}), ffn {ffn_width(mc)}")
        return lines


def build_phase7(config: Phase7Config, *, vocab_size: int, registry, kernels=None, **context) -> Phase7Model:
    if config.d_model % config.n_heads:
        raise Phase7Error(f"model.d_model ({config.d_model}) must be divisible by model.n_heads ({config.n_heads})")
    model = Phase7Model(config, vocab_size, registry, kernels or {})
    # [kernels] cross_entropy: the fused Triton head + loss, or None (LanguageModel.cross_entropy)
    from phase7fw.kernels import select

    model.cross_entropy_fn = select({"kernels": kernels, "registry": registry}, "cross_entropy", None)
    return model


def build_hybrid_block(config: HybridBlockConfig, *, model_config, layer_idx: int, registry, kernels=None, **context):
    return HybridBlock(config, model_config, layer_idx, registry, kernels or {})


@hookimpl
def register_components(register):
    register("model", "phase7", build_phase7, Phase7Config,
             description="Phase 7 hybrid LM: HTT embedding, gated hyperbolic-attention + AR-SSM blocks, SwiGLU")
    register("block", "hybrid", build_hybrid_block, HybridBlockConfig,
             description="pre-norm block: g * attention + (1 - g) * SSM, then SwiGLU FFN")
