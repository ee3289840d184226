"""The decode caches models keep, and the attention over them (the building blocks of the
cached and static decoding protocols that :mod:`phase7fw.inference.decoding` drives; the
protocols are declared in :mod:`phase7fw.interfaces`).

Dynamic (:class:`DecodeCache`): a window attention keeps the last W keys (post-RoPE) and
values in a ring buffer (:class:`KVWindow`); an unbounded one (llama) keeps them all.

Static (:class:`StaticCache`): the buffers a CUDA graph can be captured over. The dynamic
cache grows, reallocates and branches on Python ints; a captured CUDA graph replays fixed
kernels on fixed addresses. A step costs what the ring holds, not what is filled: an attention
ring of W slots (:class:`StaticRing`) is scored in full and the slots not written yet are
masked out (they hold zeros, so masked products are exact zeros, never NaN). Position p lives
in slot p % W, the layout of :class:`KVWindow`, so loading a dynamic cache is a copy. Prefill
stays on the dynamic (parallel) path; :meth:`StaticCache.load` copies its result in,
:meth:`StaticCache.store` copies the static state back when a multi-token chunk must run on
the dynamic path again (a chat turn).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F


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


# ----------------------------------------------------------------------------- static
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
    the same softmax as :func:`phase7fw.inference.decoding.cached_window_attention` (in slot order)."""
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
