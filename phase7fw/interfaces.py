"""What the engine expects of each component kind. Components subclass these.

The core knows components only through what is declared here: the model contract
(:class:`ModelContract`, checked by :func:`check_model` when a model is built; subclassing
:class:`LanguageModel` fulfils it), the optional decoding protocols (:class:`CachedDecoding`,
:class:`StaticDecoding`), and what cost estimates read from a model's parts
(:class:`AttentionLayer`, :class:`ScanLayer`: the FLOPs per token of ``phase7fw bench`` and the
preflight, the activation bytes of the memory plan).

Context passed to factories, by kind (``factory(config, **context)``):

=====================  =====================================================================
kind                   context keys
=====================  =====================================================================
model                  ``vocab_size`` (int, from the recipe or the tokenizer), ``registry``
                       (to build nested components such as ``[model.attention]``),
                       ``kernels`` (the recipe's ``[kernels]`` choices)
embedding/attention/   ``parent`` (the model config), ``registry``, ``kernels``, plus what the
ssm/block              model passes (documented by the model component)
optimizer              ``params`` (parameter groups; the no-decay group sets weight_decay=0)
lr_scheduler           ``optimizer``, ``max_steps``
curvature_scheduler    ``max_steps``
data_source            ``cache_dir`` (str), ``seed`` (int)
tokenizer              ``cache_dir`` (str), ``state`` (dict saved in a checkpoint, or None)
tracker                ``run_dir``, ``run_name``, ``recipe`` (resolved, as a dict),
                       ``resume_state`` (what ``state()`` returned before, or None),
                       ``resume_step`` (the step the run starts from; rows after it are stale)
callback               (none)
kernel                 ``device``
=====================  =====================================================================
"""

from __future__ import annotations

from typing import Iterable, Iterator, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from phase7fw.errors import Phase7Error


# ------------------------------------------------------------------------------- contracts
@runtime_checkable
class ModelContract(Protocol):
    """What the engine, the trainer and the tools call on every model (``[model]``).
    :class:`LanguageModel` implements all of it with defaults; a model that does not subclass
    it must implement each method itself (:func:`check_model` names what is missing)."""

    vocab_size: int
    seq_len: int

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor: ...  # logits (batch, seq, vocab)

    def loss(self, input_ids: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, dict]: ...

    def init_weights(self) -> None: ...

    def begin_step(self) -> None: ...

    def finish_backward(self, reduce=None) -> None: ...

    def set_curvature(self, kappa: float) -> None: ...

    def check_strategy(self, strategy: str) -> None: ...

    def enable_activation_checkpointing(self, policy: str = "full", every: int = 1) -> None: ...

    def enable_chunked_cross_entropy(self, chunk_tokens: int) -> None: ...

    def parameter_breakdown(self) -> dict[str, int]: ...

    def matmul_params(self) -> int: ...

    def flops_per_token(self, seq_len: int) -> dict: ...

    def block_activation_bytes_per_token(self, seq_len: int) -> float | None: ...


@runtime_checkable
class CachedDecoding(Protocol):
    """Incremental decoding (phase7fw/inference/decoding.py): an empty cache, then the new
    tokens after those the cache holds."""

    def init_cache(self, batch_size: int = 1): ...

    def forward_cached(self, input_ids: torch.Tensor, cache) -> torch.Tensor: ...


@runtime_checkable
class StaticDecoding(Protocol):
    """The one-token static-shape step a CUDA graph captures (phase7fw/inference/decoding.py)."""

    def init_static_cache(self, cache): ...

    def forward_static(self, static) -> None: ...


@runtime_checkable
class AttentionLayer(Protocol):
    """An attention module as the cost estimates see it (``phase7fw bench``, the preflight and
    the memory plan): its heads, its kind ("sdpa" for PyTorch's scaled_dot_product_attention,
    else the op it runs), the training FLOPs of its scores and values per token (forward and
    backward) and the scores one token keeps for the backward (heads x keys it sees)."""

    n_heads: int
    head_dim: int
    attention_kind: str

    def attention_flops_per_token(self, seq_len: int) -> float: ...

    def attention_scores_per_token(self, seq_len: int) -> int: ...


@runtime_checkable
class ScanLayer(Protocol):
    """A sequence mixer with a recurrent scan (an SSM): the scan's training FLOPs per token."""

    def scan_flops_per_token(self) -> float: ...


def _missing(obj, protocol) -> list[str]:
    names = [n for n in protocol.__annotations__] + [
        n for n, v in vars(protocol).items() if callable(v) and not n.startswith("_")]
    return [n for n in dict.fromkeys(names) if not hasattr(obj, n)
            or (n not in protocol.__annotations__ and not callable(getattr(obj, n)))]


def check_model(model, name: str) -> None:
    """Raise a :class:`Phase7Error` naming every method or attribute of the model contract
    (and of a decoding protocol the model implements only in part) that ``model`` lacks."""
    problems = []
    missing = _missing(model, ModelContract)
    if missing:
        problems.append(f"it lacks {', '.join(missing)} (subclass phase7fw.interfaces.LanguageModel for the defaults)")
    for protocol in (CachedDecoding, StaticDecoding):
        lacking = _missing(model, protocol)
        if 0 < len(lacking) < len(_missing(object(), protocol)):
            problems.append(f"it implements {protocol.__name__} only in part: {', '.join(lacking)} missing")
    if problems:
        raise Phase7Error(f"model {name!r} ({type(model).__name__}) does not fulfil the model contract"
                          f" (phase7fw/interfaces.py): {'; '.join(problems)}")


class HFModel:
    """A model in the Hugging Face layout, as a model component exports it (``phase7fw export``).

    ``config``: config.json's model keys (``architectures``, ``model_type``, sizes, and
    ``auto_map`` when the model ships its own code); ``tensors``: weights by Hugging Face
    name; ``files``: extra files of the folder (a self-contained modeling file, torch only);
    ``generation``: generation_config.json keys of the model (e.g. ``use_cache``).
    """

    def __init__(self, config: dict, tensors: dict, files: dict | None = None, generation: dict | None = None):
        self.config, self.tensors = config, tensors
        self.files, self.generation = dict(files or {}), dict(generation or {})


class LanguageModel(nn.Module):
    """A causal LM: ``forward(input_ids) -> logits`` of shape (batch, seq, vocab)."""

    vocab_size: int
    seq_len: int
    #: the repeated blocks (an ``nn.ModuleList``): the units of activation checkpointing,
    #: per-block compilation and FSDP sharding
    blocks: nn.ModuleList

    #: ``train.ce_chunk_tokens``: tokens per cross-entropy chunk, 0 = all logits at once
    ce_chunk_tokens: int = 0
    #: ``[kernels] cross_entropy``: a fused ``(hidden, weight, targets, chunk_tokens) -> mean CE``
    #: set by the model factory (``phase7fw.kernels.select(context, "cross_entropy", None)``), or
    #: None for the torch paths below. A fused kernel is used even when ce_chunk_tokens is 0 (it
    #: then picks its own chunk).
    cross_entropy_fn = None

    def loss(self, input_ids: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Training loss (next-token cross-entropy plus any auxiliary loss) and extra
        metrics to log (floats or 0-dim tensors)."""
        if self.ce_chunk_tokens or self.cross_entropy_fn is not None:
            return self.cross_entropy(self.forward_hidden(input_ids), targets), {}
        logits = self(input_ids)
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten()), {}

    def cross_entropy(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of the LM head on ``hidden`` (ignore index -100): the fused
        kernel when one is selected, else chunked when ``ce_chunk_tokens`` is set (never the full
        (tokens x vocab) logits), else the plain full-logits loss: the ``cross_entropy`` op,
        phase7fw/kernels/cross_entropy/."""
        from phase7fw.kernels.cross_entropy import linear_cross_entropy

        fn = self.cross_entropy_fn or linear_cross_entropy
        return fn(hidden, self.lm_head_weight(), targets, self.ce_chunk_tokens)

    def begin_step(self) -> None:
        """Called by the trainer before the first micro-batch of an optimizer step."""

    def finish_backward(self, reduce=None) -> None:
        """Called after the last micro-batch's backward, before clipping and the update
        (work done once per step, e.g. pushing a shared table's gradient into its factors).
        ``reduce(tensor) -> tensor`` averages a gradient over data-parallel ranks; apply it
        to any gradient made here, since the wrapper's all-reduce has already happened."""

    def check_strategy(self, strategy: str) -> None:
        """Raise a :class:`Phase7Error` naming the option when this model cannot train under
        ``parallel.strategy`` (called on the meta model, before any memory is used)."""

    def init_weights(self) -> None:
        """Initialize every parameter and buffer (called after materializing from meta)."""
        raise NotImplementedError(f"{type(self).__name__} must implement init_weights()")

    def enable_activation_checkpointing(self, policy: str = "full", every: int = 1) -> None:
        """Recompute blocks in backward (``train.activation_checkpointing``): ``policy`` is
        ``train.checkpoint_policy`` ("full" or "save_matmuls"), ``every`` is
        ``train.checkpoint_every``; ``BlockCheckpointing(policy, every).attach(self.blocks)``
        (phase7fw.components.checkpointing) implements both for a model's repeated blocks."""
        raise Phase7Error(f"model {type(self).__name__} does not support activation checkpointing")

    def enable_chunked_cross_entropy(self, chunk_tokens: int) -> None:
        """Compute the training cross-entropy ``chunk_tokens`` tokens at a time. The default
        ``loss`` does it for models with ``forward_hidden(ids) -> hidden`` and ``lm_head_weight()``."""
        if not (callable(getattr(self, "forward_hidden", None)) and callable(getattr(self, "lm_head_weight", None))):
            raise Phase7Error(f"model {type(self).__name__} does not support a chunked cross-entropy"
                              " (train.ce_chunk_tokens); set it to 0")
        self.ce_chunk_tokens = chunk_tokens

    def set_curvature(self, kappa: float) -> None:
        raise Phase7Error(
            f"model {type(self).__name__} has no curvature; remove [curvature_scheduler] from the recipe"
        )

    def hf_export(self) -> HFModel:
        """This model as a Hugging Face model (phase7fw/export/hf.py writes the folder)."""
        raise Phase7Error(f"model {type(self).__name__} has no Hugging Face export (its component does not"
                          " implement hf_export)")

    def hf_import(self, tensors: dict, config: dict) -> dict:
        """The inverse of :meth:`hf_export`: exported tensors -> this model's state dict."""
        raise Phase7Error(f"model {type(self).__name__} cannot read a Hugging Face folder (its component does not"
                          " implement hf_import)")

    def parameter_breakdown(self) -> dict[str, int]:
        """Parameter count per component (embedding, attention, ffn, norms, head, ...)."""
        return {"total": sum(p.numel() for p in self.parameters())}

    def matmul_params(self) -> int:
        """Parameters used in matmuls (embedding lookups excluded), for FLOP counts."""
        return sum(p.numel() for p in self.parameters() if p.dim() >= 2)

    #: width of the feed-forward layers (0: none), for :meth:`block_activation_bytes_per_token`
    ffn_width: int = 0

    def flops_per_token(self, seq_len: int) -> dict:
        """Training FLOPs per token (docs/performance.md): 6 N_matmul + what each
        :class:`AttentionLayer` and :class:`ScanLayer` part declares. Returns ``total`` and its
        parts ``matmul``, ``attention``, ``ssm``."""
        matmul = 6 * self.matmul_params()
        attention = sum(m.attention_flops_per_token(seq_len) for m in self.modules() if isinstance(m, AttentionLayer))
        ssm = sum(m.scan_flops_per_token() for m in self.modules() if isinstance(m, ScanLayer))
        return {"total": float(matmul + attention + ssm), "matmul": matmul, "attention": attention, "ssm": ssm}

    def block_activation_bytes_per_token(self, seq_len: int) -> float | None:
        """A rough estimate of the bytes one block keeps per token for its backward
        (docs/performance.md): ~30 d_model + 8 x the FFN width + 12 per attention score kept
        (:meth:`AttentionLayer.attention_scores_per_token`); None when the model does not say
        (no ``d_model`` or no ``blocks``)."""
        d_model, blocks = getattr(self, "d_model", 0), getattr(self, "blocks", None)
        if not d_model or not blocks:
            return None
        scores = sum(m.attention_scores_per_token(seq_len) for m in blocks[0].modules() if isinstance(m, AttentionLayer))
        return 30 * d_model + 8 * self.ffn_width + 12 * scores


class Tokenizer:
    """Text <-> token ids. ``eos_id`` separates documents."""

    vocab_size: int
    eos_id: int

    def prepare(self, texts: Iterable[str]) -> None:
        """Train or load what the tokenizer needs (no-op for fixed tokenizers)."""

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def encode_array(self, text: str) -> np.ndarray:
        """``encode`` as an integer array (tokenizers override it when they can do better)."""
        return np.asarray(self.encode(text), dtype=np.int64)

    def state(self) -> dict:
        """Everything needed to rebuild this tokenizer without data (saved in checkpoints)."""
        return {}

    def fingerprint(self) -> str:
        """A short string that changes when the token ids would change (cache keys)."""
        return type(self).__name__

    def hf_tokenizer(self) -> tuple[str, str]:
        """(tokenizer.json text in the Hugging Face tokenizers format, the EOS token's text):
        what ``phase7fw export`` writes so that ``AutoTokenizer`` loads this tokenizer."""
        raise Phase7Error(f"tokenizer {type(self).__name__} has no Hugging Face form (it does not implement"
                          " hf_tokenizer)")


class DataSource:
    """One source of the data mix. ``load_tokens`` returns a 1-D integer array of token ids,
    documents separated by ``tokenizer.eos_id``."""

    def texts(self) -> Iterator[str]:
        """Documents as text (used to train tokenizers); empty for token-only sources."""
        return iter(())

    def load_tokens(self, tokenizer: Tokenizer) -> np.ndarray:
        dtype = np.uint16 if tokenizer.vocab_size <= 65536 else np.uint32
        eos = np.asarray([tokenizer.eos_id], dtype=dtype)
        parts = []
        for doc in self.texts():
            parts += [tokenizer.encode_array(doc).astype(dtype), eos]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)

    def describe(self) -> str:
        return type(self).__name__

    def read_warnings(self) -> list[str]:
        """Problems the last pass over ``texts()`` met but worked around (files skipped or
        decoded lossily), one line each, with counts; the data log shows them."""
        return []


class Tracker:
    """Receives every logged row (dicts with ``step`` and ``split``)."""

    def log(self, row: dict) -> None:
        raise NotImplementedError

    def state(self) -> dict:
        """Saved in checkpoints and passed back as ``resume_state`` on resume (run ids)."""
        return {}

    def finish(self) -> None:
        """Flush and close; called once at the end of a run, also after an error."""


class Callback:
    """Per-step hooks into the training loop, called in recipe order (through the lifecycle
    hooks of hookspecs.py: a recipe's callbacks are their implementations for the run)."""

    def on_run_start(self, engine) -> None: ...

    def on_step_end(self, engine, row: dict) -> None: ...

    def on_eval_end(self, engine, row: dict) -> None: ...

    def on_checkpoint(self, engine, path: str) -> None: ...

    def on_run_end(self, engine, summary: dict) -> None: ...


class CurvatureScheduler:
    """kappa(step): the global curvature scale, stepped with the optimizer."""

    def value(self, step: int) -> float:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None: ...
