"""Static-shape one-token decoding: the buffers a CUDA graph can be captured over.

The dynamic cache (:class:`phase7fw.decoding.DecodeCache`) grows, reallocates and branches on
Python ints; a captured CUDA graph replays fixed kernels on fixed addresses. A model supports
static decoding when it has

- ``init_static_cache(cache) -> StaticCache``: buffers shaped and typed like the (filled,
  dynamic) ``cache``, loaded from it;
- ``forward_static(static)``: one decode step of ``static.token`` at position ``static.pos``
  (device tensors); writes ``static.logits`` and advances ``static.pos`` by one. Every
  tensor it touches keeps its shape and address from step to step; it never reads a device
  value on the host (no ``.item()``) and never branches on one.

A step costs what the ring holds, not what is filled: an attention ring of W slots is scored
in full and the slots not written yet are masked out (they hold zeros, so masked products are
exact zeros, never NaN). Position p lives in slot p % W, the layout of
:class:`phase7fw.decoding.KVWindow`, so loading a dynamic cache is a copy.

Prefill stays on the dynamic (parallel) path; :meth:`StaticCache.load` copies its result in,
:meth:`StaticCache.store` copies the static state back when a multi-token chunk must run on the
dynamic path again (a chat turn).
"""

from __future__ import annotations

from typing import Callable

import torch

from phase7fw.decoding import DecodeCache, KVWindow


def supports_static_decode(model) -> bool:
    """Whether ``model`` implements the static one-token step (module docstring)."""
    check = getattr(model, "supports_static_decode", None)
    if callable(check):
        return bool(check())
    return callable(getattr(model, "init_static_cache", None)) and callable(getattr(model, "forward_static", None))


class StaticRing:
    """Keys/values of a bounded :class:`KVWindow` in fixed buffers (B, H, W, D), zeros where
    nothing has been written."""

    def __init__(self, kv: KVWindow):
        if kv.capacity is None or kv.k is None or kv.k.shape[2] != kv.capacity:
            raise ValueError("StaticRing needs a bounded, filled KVWindow")
        self.capacity = kv.capacity
        self.k, self.v = torch.zeros_like(kv.k), torch.zeros_like(kv.v)
        self.slots = torch.arange(kv.capacity, device=kv.k.device)
        self.load(kv)

    def load(self, kv: KVWindow) -> None:
        n = len(kv)
        for mine, theirs in ((self.k, kv.k), (self.v, kv.v)):
            mine.zero_()
            mine[:, :, :n] = theirs[:, :, :n]

    def store(self, kv: KVWindow, total: int) -> None:
        kv.k, kv.v, kv.total = self.k.clone(), self.v.clone(), total

    def write(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> None:
        """Store one position's k, v (B, H, 1, D) at slot pos % W."""
        slot = (pos % self.capacity).view(1)
        self.k.index_copy_(2, slot, k.to(self.k.dtype))
        self.v.index_copy_(2, slot, v.to(self.v.dtype))

    def mask(self, pos: torch.Tensor) -> torch.Tensor:
        """(1, W) True where a slot holds one of the positions max(0, pos-W+1)..pos (the ring
        holds exactly the last W positions, so the window rule is the filled rule)."""
        return (self.slots <= pos).view(1, -1)


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ring: StaticRing, pos: torch.Tensor,
                   scores: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Attention of one query (B, H, 1, D) at ``pos`` over the ring after storing k, v there;
    the same softmax as :func:`phase7fw.decoding.cached_window_attention` (in slot order)."""
    ring.write(k, v, pos)
    logits = scores(q, ring.k).masked_fill(~ring.mask(pos), float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return (probs @ ring.v.to(probs.dtype)).to(v.dtype)


class StaticCache:
    """A model's static decode state: the input ``token`` (1, 1), the position ``pos`` (0-dim
    int64, tokens already in the cache), the output ``logits`` (1, vocab) fp32, one entry per
    layer (a static part, or a dict of them, with ``load(dyn)`` / ``store(dyn, pos)``), and
    ``extra`` (e.g. the LM-head table)."""

    def __init__(self, layers: list, cache: DecodeCache, vocab_size: int, device, extra: dict | None = None):
        self.token = torch.zeros(1, 1, dtype=torch.long, device=device)
        self.pos = torch.zeros((), dtype=torch.long, device=device)
        self.logits = torch.zeros(1, vocab_size, dtype=torch.float32, device=device)
        self.layers = layers
        self.extra = extra or {}
        self.load(cache)

    def _pairs(self, cache: DecodeCache):
        for mine, theirs in zip(self.layers, cache.layers):
            if isinstance(mine, dict):
                yield from ((mine[name], theirs[name]) for name in mine if mine[name] is not None)
            else:
                yield mine, theirs

    def load(self, cache: DecodeCache) -> None:
        """Copy the dynamic ``cache`` in (after a prefill)."""
        self.pos.fill_(cache.pos)
        for mine, theirs in self._pairs(cache):
            mine.load(theirs)
        for name, table in self.extra.items():
            other = cache.extra.get(name)
            if other is not None and other is not table:
                table.copy_(other)

    def store(self, cache: DecodeCache, pos: int) -> None:
        """Copy the state back into the dynamic ``cache``, which then holds ``pos`` tokens."""
        cache.pos = pos
        for mine, theirs in self._pairs(cache):
            mine.store(theirs, pos)

    def buffers(self) -> list[torch.Tensor]:
        """Every tensor a captured step reads or writes in place (tests check their addresses)."""
        out = [self.token, self.pos, self.logits, *self.extra.values()]
        for layer in self.layers:
            for part in (layer.values() if isinstance(layer, dict) else [layer]):
                if part is not None:
                    out += [t for t in vars(part).values() if isinstance(t, torch.Tensor)]
        return out
