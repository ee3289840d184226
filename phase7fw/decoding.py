"""Cached (incremental) decoding: per-layer caches, a window-attention helper, the Decoder.

A model supports cached decoding when it has

- ``init_cache(batch_size) -> DecodeCache``: an empty cache (tensors are allocated lazily, in
  the dtype of what is stored, on the first call that stores something);
- ``forward_cached(input_ids (B, T), cache) -> logits (B, T, vocab)``: runs the T new tokens
  that follow the ``cache.pos`` tokens already in the cache, and advances the cache. On an
  empty cache it uses the parallel (training) path for the whole prompt ("prefill").
- ``context_limit``: the most tokens the model may see at once (``None``: unbounded, e.g. the
  phase7 model, whose attention is windowed and whose SSM state is O(1)).

What each layer keeps: a window attention keeps the last W keys (post-RoPE) and values in a
ring buffer (:class:`KVWindow`); the AR-SSM keeps its conv tail and fp32 state; the llama
model keeps a KV cache of up to ``seq_len`` tokens. A decoded token then costs O(1) in the
context length for phase7 (O(W) attention + O(1) state update).

:class:`Decoder` feeds a token sequence to a model and returns next-token logits, with or
without the cache; both modes see exactly the same tokens (the context rule below), so
greedy decoding gives the same tokens either way (tested).

Context rule for a model with ``context_limit = N`` (llama): a sequence longer than N keeps
its last N tokens; when generation then outgrows N, the oldest tokens are dropped so that the
last ``N // 2`` remain and the cache is rebuilt from them (one parallel prefill of N/2 tokens
every N/2 new tokens). Sliding one token at a time cannot be done exactly with a cache (the
cached keys of a layer > 0 depend on the dropped tokens), so the cheaper chunked slide is used
by both modes.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable

import torch
import torch.nn.functional as F

from phase7fw.errors import Phase7Error


class KVWindow:
    """Keys and values (B, H, T, D) of the last ``capacity`` positions (``None``: all of them).

    A bounded window is a ring buffer: position p lives in slot p % capacity, so appending
    never moves data. :meth:`view` returns the kept positions in chronological order.
    """

    def __init__(self, capacity: int | None):
        if capacity is not None and capacity < 1:
            raise ValueError(f"KVWindow capacity must be >= 1 or None, got {capacity}")
        self.capacity = capacity
        self.total = 0  # positions appended so far
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.total if self.capacity is None else min(self.total, self.capacity)

    def _ensure(self, k: torch.Tensor, v: torch.Tensor, needed: int) -> None:
        have = 0 if self.k is None else self.k.shape[2]
        if (self.capacity is not None and self.k is not None) or have >= needed:
            return
        # A ring is allocated once; an unbounded window doubles (amortized O(1) appends).
        size = self.capacity or max(needed, 2 * have, 64)
        B, H, _, D = k.shape
        new_k, new_v = k.new_empty(B, H, size, D), v.new_empty(B, H, size, v.shape[-1])
        if have:
            new_k[:, :, : self.total] = self.k[:, :, : self.total]
            new_v[:, :, : self.total] = self.v[:, :, : self.total]
        self.k, self.v = new_k, new_v

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        T = k.shape[2]
        if T == 0:
            return
        self._ensure(k, v, self.total + T)
        if self.capacity is None:
            self.k[:, :, self.total : self.total + T] = k
            self.v[:, :, self.total : self.total + T] = v
        else:
            keep = min(T, self.capacity)  # older ones would be overwritten anyway
            slots = (torch.arange(self.total + T - keep, self.total + T, device=k.device)) % self.capacity
            self.k.index_copy_(2, slots, k[:, :, T - keep :].to(self.k.dtype))
            self.v.index_copy_(2, slots, v[:, :, T - keep :].to(self.v.dtype))
        self.total += T

    def view(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(k, v) of the kept positions, oldest first; ``None`` while empty."""
        if self.total == 0:
            return None
        n = len(self)
        if self.capacity is None or self.total <= self.capacity:
            return self.k[:, :, :n], self.v[:, :, :n]
        order = (self.total + torch.arange(self.capacity, device=self.k.device)) % self.capacity
        return self.k.index_select(2, order), self.v.index_select(2, order)


class DecodeCache:
    """A model's cache: ``pos`` tokens consumed, one entry per layer (whatever the layer
    keeps), and ``extra`` for model-level things computed once (e.g. a tied LM-head table)."""

    def __init__(self, layers: list):
        self.pos = 0
        self.layers = layers
        self.extra: dict = {}


def window_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """True where query position i may see key position j: j <= i and i - j < window."""
    i, j = q_pos.unsqueeze(-1), k_pos.unsqueeze(-2)
    mask = j <= i
    if window:
        mask &= (i - j) < window
    return mask


def cached_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv: KVWindow,
    window: int | None,
    scores: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    prefill: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Attention of T new queries over the cached window plus the new keys; stores the new
    keys/values in ``kv``. q, k, v: (B, H, T, D) for the T positions after the cached ones.

    ``scores(q, keys) -> (B, H, Tq, L)`` (fp32 or fp64) gives the logits of the softmax;
    ``prefill(q, k, v)`` is the model's parallel path, used when the cache is empty. Otherwise
    queries go in blocks of at most W (so a block sees at most 2W keys: memory O(W^2), not
    O(T^2)); a single decoded token is one block of one query.
    """
    if kv.total == 0 and prefill is not None:
        out = prefill(q, k, v)
        kv.append(k, v)
        return out
    T = q.shape[2]
    block = window or 256
    outs = []
    for s in range(0, T, block):
        qb, kb, vb = q[:, :, s : s + block], k[:, :, s : s + block], v[:, :, s : s + block]
        cached = kv.view()
        keys, vals = (kb, vb) if cached is None else (torch.cat([cached[0], kb.to(cached[0].dtype)], 2),
                                                      torch.cat([cached[1], vb.to(cached[1].dtype)], 2))
        L, Tb = keys.shape[2], qb.shape[2]
        logits = scores(qb, keys)
        pos = torch.arange(L, device=q.device)
        mask = window_mask(pos[L - Tb :], pos, window)
        probs = torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=-1)
        outs.append((probs @ vals.to(probs.dtype)).to(v.dtype))
        kv.append(kb, vb)
    return torch.cat(outs, dim=2)


def supports_cache(model) -> bool:
    """Whether ``model`` implements the cached-decoding protocol (module docstring)."""
    check = getattr(model, "supports_cache", None)
    if callable(check):
        return bool(check())
    return callable(getattr(model, "init_cache", None)) and callable(getattr(model, "forward_cached", None))


def context_limit(model) -> int | None:
    """The most tokens ``model`` sees at once: its ``context_limit``, else its ``seq_len``."""
    if hasattr(model, "context_limit"):
        return model.context_limit
    return getattr(model, "seq_len", None)


class Decoder:
    """Feeds a growing token sequence to a model; :meth:`logits` gives the next token's logits.

    ``use_cache=False`` recomputes the visible context every time (the reference);
    ``use_cache=True`` keeps the model's cache and runs only the new tokens. Both follow the
    same context rule (module docstring), so they see the same tokens.
    """

    def __init__(self, model, *, use_cache: bool = True, device=None, autocast=None):
        self.model = model
        self.device = device if device is not None else next(model.parameters()).device
        self.autocast = autocast or contextlib.nullcontext
        self.limit = context_limit(model)
        if use_cache and not supports_cache(model):
            use_cache = False  # a plugin model without a cache: still correct, just slower
        self.use_cache = use_cache
        #: which path computes a decoded token (reported by benchmarks)
        self.path = "dynamic-cache" if use_cache else "recompute"
        self.reset()

    # -- sequence -------------------------------------------------------------------------
    def reset(self, ids=()) -> None:
        """Start a new sequence (drops the cache)."""
        self.ids: list[int] = list(ids)
        self.start = 0 if self.limit is None else max(0, len(self.ids) - self.limit)
        self.cache = None
        self.cache_start = self.fed = 0  # the cache holds ids[cache_start:fed]
        self.prefill_tokens = 0  # tokens run through the model (for benchmarks)

    def extend(self, tokens) -> None:
        self.ids.extend(int(t) for t in tokens)

    def sync(self, ids) -> None:
        """Make ``ids`` the sequence: keeps the cache when the current one is its prefix."""
        ids = list(ids)
        n = len(self.ids)
        if n <= len(ids) and ids[:n] == self.ids:
            self.extend(ids[n:])
        else:
            self.reset(ids)

    def visible(self) -> list[int]:
        """The tokens the model sees for the next prediction (applies the context rule)."""
        n = len(self.ids)
        if self.limit is not None and n - self.start > self.limit:
            self.start = n - max(1, self.limit // 2)
        return self.ids[self.start :]

    # -- model ----------------------------------------------------------------------------
    @torch.no_grad()
    def logits(self) -> torch.Tensor:
        """(1, vocab) logits of the token after the current sequence (fp32 or wider)."""
        if not self.ids:
            raise Phase7Error("generation needs at least one token of context")
        context = self.visible()
        if not self.use_cache:
            new, self.prefill_tokens = context, self.prefill_tokens + len(context)
            with self.autocast():
                out = self.model(torch.tensor([new], device=self.device))
            return out[:, -1].float()
        if self.cache is None or self.cache_start != self.start:
            self.cache = self.model.init_cache(1)
            self.cache_start = self.fed = self.start
        new = self.ids[self.fed :]
        if not new:  # asked twice for the same position
            return self._last
        self.prefill_tokens += len(new)
        with self.autocast():
            out = self.model.forward_cached(torch.tensor([new], device=self.device), self.cache)
        self.fed = len(self.ids)
        self._last = out[:, -1].float()
        return self._last


CUDA_GRAPH_MODES = ("auto", "on", "off")


def _stderr_line(text: str) -> None:
    import sys

    print(text, file=sys.stderr, flush=True)


class GraphedDecoder(Decoder):
    """A cached :class:`Decoder` whose one-token steps run the model's static-shape step
    (:mod:`phase7fw.static_decoding`): captured once in a CUDA graph and replayed per token
    (``capture=True`` on CUDA), or run eagerly (CPU, ``capture=False``).

    Prompts and multi-token continuations (a chat turn) run on the dynamic path (parallel
    prefill) and are then copied into the static buffers; the context rule is the
    :class:`Decoder`'s, so the tokens are the same. The graph is captured after the first
    prefill and reused for every later sequence. ``strict``: a failed capture is an error;
    otherwise ``say`` gets one line and decoding continues on the dynamic cached path.

    ``compile_step`` (experimental, not yet measured on a GPU): the step is first compiled by
    ``torch.compile`` (inductor fuses its many small ops; no CUDA graphs of its own), during
    the warm-up, and the compiled step is what the graph captures. A replayed graph is bound by
    its kernel count, which the phase7 step has ~2.6x more of than llama's.
    """

    def __init__(self, model, *, device=None, autocast=None, capture: bool = True, strict: bool = False,
                 warmup_steps: int = 2, compile_step: bool = False, say: Callable[[str], None] = _stderr_line):
        from phase7fw.static_decoding import supports_static_decode

        if not (supports_cache(model) and supports_static_decode(model)):
            raise Phase7Error(f"{type(model).__name__} has no static decode step (init_static_cache / forward_static;"
                              " phase7 sdpa attention needs a window > 0)")
        super().__init__(model, use_cache=True, device=device, autocast=autocast)
        self.capture = capture and self.device.type == "cuda"
        self.strict, self.warmup_steps, self.say = strict, warmup_steps, say
        self.static = None  # StaticCache, allocated at the first prefill
        self.graph = None
        self.fallback = False  # capture failed: dynamic path from then on
        self.path = "cuda-graph" if self.capture else "static-eager"
        self.step = model.forward_static
        if compile_step:
            self.step = torch.compile(model.forward_static, fullgraph=True, dynamic=False)
            self.path += "+compile"

    def reset(self, ids=()) -> None:
        super().reset(ids)
        self.in_static = False  # whether the static buffers (not self.cache) hold the state
        self.static_steps = 0  # tokens decoded by the static step (tests, benchmarks)

    @torch.no_grad()
    def logits(self) -> torch.Tensor:
        if not self.ids or self.fallback:
            return super().logits()
        self.visible()  # applies the context rule (may move self.start)
        if self.cache is None or self.cache_start != self.start:
            self.cache = self.model.init_cache(1)
            self.cache_start = self.fed = self.start
            self.in_static = False
        new = self.ids[self.fed :]
        if not new:
            return self._last
        self.prefill_tokens += len(new)
        if len(new) == 1 and self.in_static:
            self.static.token.fill_(new[0])
            if self.graph is not None:
                self.graph.replay()
            else:
                with self.autocast():
                    self.step(self.static)
            self.fed += 1
            self.static_steps += 1
            self._last = self.static.logits.clone()  # the next step overwrites the buffer
            return self._last
        if self.in_static:  # continue the sequence on the dynamic path
            self.static.store(self.cache, self.fed - self.cache_start)
        with self.autocast():
            out = self.model.forward_cached(torch.tensor([new], device=self.device), self.cache)
        self.fed = len(self.ids)
        self._last = out[:, -1].float()
        self._to_static()
        return self._last

    def _to_static(self) -> None:
        """Copy the dynamic cache into the static buffers (allocated and captured the first time)."""
        if self.static is not None:
            self.static.load(self.cache)
            self.in_static = True
            return
        self.static = self.model.init_static_cache(self.cache)
        if self.capture:
            try:
                self.graph = self._capture()
            except Exception as exc:  # noqa: BLE001 - reported, never silent
                self.graph, self.static = None, None
                cause = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                if self.strict:
                    raise Phase7Error(f"CUDA graph capture of the decode step failed ({cause})") from exc
                self.fallback, self.path = True, "dynamic-cache"
                self.say(f"cuda graph: capture failed ({cause}); decoding runs the dynamic cached path (eager)")
                return
            self.static.load(self.cache)  # undo the warm-up steps
        self.in_static = True

    def _capture(self):
        """Warm the step up on a side stream (lazy inits, cuBLAS workspaces), then capture it."""
        static = self.static
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup_steps):
                # Position 0 is valid for every model (after a prompt of seq_len tokens, llama's
                # next position is past its RoPE table: the decoder slides before stepping).
                static.pos.fill_(0)
                with self.autocast():
                    self.step(static)  # compiles here with compile_step
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            with self.autocast():
                self.step(static)
        return graph


def make_decoder(model, *, use_cache: bool = True, cuda_graph: str = "auto", device=None, autocast=None,
                 compile_step: bool = False, say: Callable[[str], None] = _stderr_line) -> Decoder:
    """The decoder for ``cuda_graph`` = auto (a captured static step on CUDA when the model has
    one), on (that, or an error) or off (the dynamic cached path). Never silently different:
    under auto on CUDA a model without a static step, or a failed capture, prints one line."""
    if cuda_graph not in CUDA_GRAPH_MODES:
        raise Phase7Error(f"--cuda-graph must be one of {', '.join(CUDA_GRAPH_MODES)}, got {cuda_graph!r}")
    from phase7fw.static_decoding import supports_static_decode

    device = torch.device(device) if device is not None else next(model.parameters()).device
    plain = dict(device=device, autocast=autocast)
    if cuda_graph == "off":
        return Decoder(model, use_cache=use_cache, **plain)
    on = cuda_graph == "on"
    if on and not use_cache:
        raise Phase7Error("--cuda-graph on decodes with the cache; it cannot be combined with --no-cache")
    if device.type != "cuda":
        if on:
            raise Phase7Error(f"--cuda-graph on needs a CUDA device; this runs on {device.type}"
                              " (use auto or off)")
        return Decoder(model, use_cache=use_cache, **plain)
    if not use_cache:
        return Decoder(model, use_cache=False, **plain)
    if not (supports_cache(model) and supports_static_decode(model)):
        if on:
            raise Phase7Error(f"--cuda-graph on: {type(model).__name__} has no static decode step")
        say(f"cuda graph: {type(model).__name__} has no static decode step; decoding runs the dynamic cached path")
        return Decoder(model, use_cache=True, **plain)
    return GraphedDecoder(model, capture=True, strict=on, compile_step=compile_step, say=say, **plain)


def prepare_for_inference(model: torch.nn.Module, dtype: torch.dtype | None) -> torch.nn.Module:
    """Store the weights of linear layers in ``dtype`` (bf16/fp16) for decoding under
    autocast: the per-call fp32 -> bf16 weight cast would otherwise dominate a decoded token.
    Buffers (RoPE tables, curvature) and other parameters stay fp32. For inference only."""
    if dtype is None or dtype == torch.float32:
        return model.eval()
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module.to(dtype)
    return model.eval()


def dot_product_scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """q k^T / sqrt(D) in fp32 (fp64 for fp64 inputs): the SDPA logits, for
    :func:`cached_window_attention`."""
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    with torch.autocast(q.device.type, enabled=False):
        return (q.to(dt) @ k.to(dt).transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))


def causal_sdpa_with_prefix(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, enable_gqa: bool = False):
    """SDPA of the last Tq positions over Tk >= Tq keys (the first Tk - Tq from a cache)."""
    Tq, Tk = q.shape[2], k.shape[2]
    if Tq == Tk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=enable_gqa)
    if Tq == 1:
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=enable_gqa)
    pos = torch.arange(Tk, device=q.device)
    mask = window_mask(pos[Tk - Tq :], pos, None)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=enable_gqa)
