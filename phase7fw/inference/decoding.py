"""Cached and static (CUDA-graph) decoding: the Decoder and the GraphedDecoder.

The caches models keep are in :mod:`phase7fw.components.caches`. A model supports cached
decoding when it has

- ``init_cache(batch_size) -> DecodeCache``: an empty cache (tensors are allocated lazily, in
  the dtype of what is stored, on the first call that stores something);
- ``forward_cached(input_ids (B, T), cache) -> logits (B, T, vocab)``: runs the T new tokens
  that follow the ``cache.pos`` tokens already in the cache, and advances the cache. On an
  empty cache it uses the parallel (training) path for the whole prompt ("prefill").
- ``context_limit``: the most tokens the model may see at once (``None``: unbounded, e.g. the
  phase7 model, whose attention is windowed and whose SSM state is O(1)).

and static one-token decoding when it also has

- ``init_static_cache(cache) -> StaticCache``: buffers shaped and typed like the (filled,
  dynamic) ``cache``, loaded from it;
- ``forward_static(static)``: one decode step of ``static.token`` at position ``static.pos``
  (device tensors); writes ``static.logits`` and advances ``static.pos`` by one. Every
  tensor it touches keeps its shape and address from step to step; it never reads a device
  value on the host (no ``.item()``) and never branches on one.

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
from typing import Callable

import torch

from phase7fw.errors import Phase7Error


def supports_static_decode(model) -> bool:
    """Whether ``model`` implements the static one-token step (module docstring)."""
    check = getattr(model, "supports_static_decode", None)
    if callable(check):
        return bool(check())
    return callable(getattr(model, "init_static_cache", None)) and callable(getattr(model, "forward_static", None))


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
    (module docstring; buffers: :class:`phase7fw.components.caches.StaticCache`): captured once in a CUDA graph and replayed per token
    (``capture=True`` on CUDA), or run eagerly (CPU, ``capture=False``).

    Prompts and multi-token continuations (a chat turn) run on the dynamic path (parallel
    prefill) and are then copied into the static buffers; the context rule is the
    :class:`Decoder`'s, so the tokens are the same. The graph is captured after the first
    prefill and reused for every later sequence. ``strict``: a failed capture is an error;
    otherwise ``say`` gets one line and decoding continues on the dynamic cached path.

    ``compile_step``: the step is first compiled by ``torch.compile`` (inductor fuses its many
    small ops; no CUDA graphs of its own), during the warm-up, and the compiled step is what the
    graph captures (H200, 2026-12-07: the 1.5B phase7 2.91 ms a token, llama 1.62;
    benchmarks/RESULTS.md). A replayed graph is bound by its kernel count, which the compiled
    phase7 step has ~1.9x more of than llama's.
    """

    def __init__(self, model, *, device=None, autocast=None, capture: bool = True, strict: bool = False,
                 warmup_steps: int = 2, compile_step: bool = False, say: Callable[[str], None] = _stderr_line):
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


def check_compile_step(cuda_graph: str, use_cache: bool, device, model=None) -> None:
    """``compile_step`` compiles the step that a CUDA graph captures: an error naming why where
    no graph would be captured (it would otherwise do nothing). ``model`` None: what can be
    checked before the model is built (``bench`` checks before it measures anything)."""
    device = torch.device(device)
    if cuda_graph == "off":
        why = "--cuda-graph off"
    elif not use_cache:
        why = "--no-cache"
    elif device.type != "cuda":
        why = f"a {device.type} device (it needs CUDA)"
    elif model is not None and not (supports_cache(model) and supports_static_decode(model)):
        why = f"{type(model).__name__}, which has no static decode step"
    else:
        return
    raise Phase7Error(f"--compile-step compiles the decode step that a CUDA graph captures; it cannot run with {why}")


def make_decoder(model, *, use_cache: bool = True, cuda_graph: str = "auto", device=None, autocast=None,
                 compile_step: bool = False, say: Callable[[str], None] = _stderr_line) -> Decoder:
    """The decoder for ``cuda_graph`` = auto (a captured static step on CUDA when the model has
    one), on (that, or an error) or off (the dynamic cached path). Never silently different:
    under auto on CUDA a model without a static step, or a failed capture, prints one line.
    ``compile_step`` compiles the step that the graph captures (:func:`check_compile_step`)."""
    if cuda_graph not in CUDA_GRAPH_MODES:
        raise Phase7Error(f"--cuda-graph must be one of {', '.join(CUDA_GRAPH_MODES)}, got {cuda_graph!r}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    if compile_step:
        check_compile_step(cuda_graph, use_cache, device, model)
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


def prepare_for_inference(model: torch.nn.Module, dtype: torch.dtype | None, *, int8: bool = False) -> torch.nn.Module:
    """Store the weights of linear layers in ``dtype`` (bf16/fp16) for decoding under
    autocast: the per-call fp32 -> bf16 weight cast would otherwise dominate a decoded token.
    Buffers (RoPE tables, curvature) and other parameters stay fp32. Then each block that can
    fuses the projections of its normed input into one matmul for the static decode step
    (``fuse_input_projections``). ``int8``: then the blocks' linear layers keep int8 weights
    with per-row scales (:mod:`phase7fw.inference.int8`; any ``dtype``). For inference only."""
    from phase7fw.inference.int8 import Int8Linear

    if any(isinstance(m, Int8Linear) for m in model.modules()):
        raise Phase7Error("this model's weights are int8 already (prepared for int8 decoding); prepare a fresh model")
    if dtype is not None and dtype != torch.float32:
        fusable = [m for m in model.modules() if callable(getattr(m, "fuse_input_projections", None))]
        for module in fusable:
            module.fused_input = None  # a cast below replaces the weights a fusion viewed
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.to(dtype)
        for module in fusable:
            module.fuse_input_projections()
    if int8:
        from phase7fw.inference.int8 import quantize_linears

        if getattr(model, "blocks", None) is None or not quantize_linears(model):
            raise Phase7Error(f"--int8: {type(model).__name__} has no linear layers in its blocks to quantize")
    return model.eval()


def prepare_engine_for_decoding(engine, *, int8: bool = False) -> torch.nn.Module:
    """:func:`prepare_for_inference` of ``engine``'s model: on a GPU with bf16/fp16 training
    precision the linear weights in that precision (decoding reads every weight per token);
    ``int8`` as there. What ``generate``, ``chat`` and ``bench --generate`` decode with."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(engine.recipe.train.precision)
    return prepare_for_inference(engine.model, dtype if engine.device.type == "cuda" else None, int8=int8)
