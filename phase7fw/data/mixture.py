"""Token streams of the data mix and the sampler that cuts training windows from them.

:func:`load_mix` builds the recipe's sources, prepares the tokenizer on a weighted sample of
them, and gets each source's tokens from the tokenized cache (:mod:`phase7fw.data.cache`,
memory-mapped, so huge sources are never read into RAM). Each source is split into a
training part and a held-out validation tail (``data.val_fraction``). The
:class:`MixtureSampler` draws each window's source by weight, from a random generator seeded
by (seed, split, batch index), and its offset uniformly (``data.sampling = "random"``) or as
the source's next window in a shuffled epoch (``"epochs"``: windows at stride seq_len, a new
order and phase each epoch, so no text repeats before the source is used up). Batch ``i`` is
the same whatever happened before it, so resuming only needs the index.

Bits per byte: the cache records how many UTF-8 bytes of text each source's tokens came
from, so a source has a bytes-per-token ratio (EOS tokens included in the count, as they
are in the loss), and :meth:`MixtureSampler.batch_bytes` gives the bytes behind a batch's
targets. Sources without text (synthetic tokens) have no ratio and no bits per byte.
"""

from __future__ import annotations

import math
import time
from typing import Callable, Iterator, Sequence

import attrs
import numpy as np
import torch

from phase7fw.data.cache import cached_tokens, digest, source_identity, token_dtype
from phase7fw.errors import Phase7Error
from phase7fw.interfaces import DataSource
from phase7fw.recipe.convert import structure_component
from phase7fw.recipe.options import to_raw

DEFAULT_SAMPLE_CHARS = 20_000_000  # tokenizer training sample, when the tokenizer does not say


@attrs.define
class SourceTokens:
    label: str
    weight: float
    train: np.ndarray
    val: np.ndarray
    info: dict = attrs.Factory(dict)  # cache status, path, document count (for reports)
    bytes_per_token: float | None = None  # UTF-8 bytes of source text per token; None: unknown


def split_tokens(label: str, weight: float, tokens: np.ndarray, val_fraction: float, window: int) -> SourceTokens:
    """Hold out the last ``val_fraction`` of a source; both parts must fit one window.
    (Slices of a memmap stay memmaps: nothing is read here.)"""
    n_val = int(len(tokens) * val_fraction)
    cut = len(tokens) - n_val
    train, val = tokens[:cut], tokens[cut:]
    if len(train) < window:
        raise Phase7Error(
            f"data source {label} has {len(tokens)} tokens: too few for training windows of"
            f" {window} tokens (seq_len + 1) after holding out {n_val} for validation;"
            " add data or lower model.seq_len"
        )
    if val_fraction > 0 and len(val) < window:
        raise Phase7Error(
            f"data source {label}: its validation split ({n_val} tokens, data.val_fraction ="
            f" {val_fraction}) is shorter than one window of {window} tokens; raise"
            " data.val_fraction, add data or lower model.seq_len"
        )
    return SourceTokens(label, weight, train, val)


@attrs.define
class BuiltSource:
    label: str  # "data.sources[0] (python_stdlib)"
    name: str
    weight: float
    source: DataSource
    identity: dict  # what the cache key and the tokenizer sample key hash

    @property
    def tokenizes_texts(self) -> bool:
        """Sources that override ``load_tokens`` make their own ids (e.g. synthetic) and are
        not cached; every other source is tokenized from ``texts()`` through the cache."""
        return type(self.source).load_tokens is DataSource.load_tokens


def build_sources(recipe, registry, *, cache_dir: str, dummy_data: bool = False) -> list[BuiltSource]:
    """The recipe's ``[[data.sources]]`` (or one synthetic source for ``--dummy-data``)."""
    specs = list(recipe.data.sources)
    if dummy_data:
        errors: list[str] = []
        # enough tokens that the validation tail holds two windows even at long sequence lengths
        window = getattr(recipe.model.config, "seq_len", 0) + 1
        n_tokens = max(1_000_000, math.ceil(2 * window / max(recipe.data.val_fraction, 1e-3)))
        specs = [structure_component({"name": "synthetic", "n_tokens": n_tokens}, "data_source", registry,
                                     "--dummy-data", errors)]
        if errors:
            raise Phase7Error("; ".join(errors))
    if not specs:
        raise Phase7Error("the recipe has no [[data.sources]]; add one or run with --dummy-data")
    built = []
    for i, spec in enumerate(specs):
        label = f"data.sources[{i}] ({spec.name})"
        src = registry.build("data_source", spec.name, spec.config, cache_dir=cache_dir, seed=recipe.run.seed)
        built.append(BuiltSource(label, spec.name, spec.weight, src, source_identity(spec.name, to_raw(spec.config), src)))
    return built


class TextSample:
    """Documents for tokenizer training: from each text source a share of ``budget_chars``
    proportional to its weight, taken from the start of the source. ``identity`` names the
    sample without reading it, so a trained tokenizer can be found again in the cache."""

    def __init__(self, sources: Sequence[BuiltSource], budget_chars: int):
        self.sources = [s for s in sources if s.tokenizes_texts]
        self.budget_chars = budget_chars
        self.identity = digest({"sources": [(s.identity, s.weight) for s in self.sources], "budget": budget_chars})

    @property
    def empty(self) -> bool:
        return not self.sources

    def __iter__(self) -> Iterator[str]:
        total = sum(s.weight for s in self.sources)
        for s in self.sources:
            share, used = self.budget_chars * s.weight / total, 0
            for text in s.source.texts():
                if used >= share:
                    break
                used += len(text)
                yield text


def load_mix(recipe, registry, tokenizer, *, cache_dir: str, dummy_data: bool = False, workers: int | None = None,
             log: Callable[[str], None] | None = None) -> list[SourceTokens]:
    """Every source of the recipe as train/validation token arrays (tokenizing on a cache miss)."""
    log = log or (lambda _line: None)
    built = build_sources(recipe, registry, cache_dir=cache_dir, dummy_data=dummy_data)
    tokenizer.prepare(TextSample(built, getattr(tokenizer, "sample_chars", DEFAULT_SAMPLE_CHARS)))
    if getattr(tokenizer, "status", None):
        log(f"tokenizer {recipe.data.tokenizer.name} (vocab {tokenizer.vocab_size}): {tokenizer.status}")
    seq_len = getattr(recipe.model.config, "seq_len", None)
    if not isinstance(seq_len, int):
        raise Phase7Error(f"model {recipe.model.name!r} has no seq_len option; the data sampler needs one")
    out = []
    for b in built:
        start = time.perf_counter()
        label = f"{b.label} {b.source.describe()}"
        if b.tokenizes_texts:
            count = getattr(b.source, "num_documents", None)
            notes = getattr(b.source, "read_warnings", None)
            got = cached_tokens(b.label, b.identity, b.source.texts(), tokenizer, cache_dir, workers=workers,
                                total=count if callable(count) else None, warnings=notes if callable(notes) else None)
            tokens = got.tokens
            info = {"status": got.status, "path": str(got.path), "n_docs": got.meta["n_docs"],
                    "n_bytes": got.meta.get("n_bytes")}
            for line in got.meta.get("warnings") or ():
                log(f"warning: {b.label}: {line}")
        else:
            tokens = _uncached_tokens(b, tokenizer)
            info = {"status": "generated", "path": None, "n_docs": None, "n_bytes": None}
        info.update(n_tokens=len(tokens), dtype=str(tokens.dtype), seconds=time.perf_counter() - start)
        where = f" at {info['path']}" if info["path"] else ""
        log(f"{b.label}: {info['status']}, {len(tokens):,} tokens ({tokens.dtype}){where}")
        src = split_tokens(label, b.weight, tokens, recipe.data.val_fraction, seq_len + 1)
        src.info = info
        src.bytes_per_token = info["n_bytes"] / len(tokens) if info["n_bytes"] else None
        out.append(src)
    return out


def _uncached_tokens(b: BuiltSource, tokenizer) -> np.ndarray:
    tokens = np.asarray(b.source.load_tokens(tokenizer))
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
        raise Phase7Error(f"{b.label}: load_tokens must return a 1-D integer array, got {tokens.dtype} {tokens.shape}")
    if len(tokens) == 0:
        raise Phase7Error(f"{b.label}: the source is empty")
    if int(tokens.max()) >= tokenizer.vocab_size or int(tokens.min()) < 0:
        raise Phase7Error(f"{b.label}: token id {int(tokens.max())} is outside the tokenizer's vocabulary"
                          f" ({tokenizer.vocab_size})")
    return tokens.astype(token_dtype(tokenizer.vocab_size), copy=False)


class MixtureSampler:
    """Batches of (input, target) windows drawn from several sources by weight.

    With ``world_size`` processes, batch ``i`` of rank ``r`` is rows ``r*b .. (r+1)*b`` of
    the global batch of ``world_size * b`` rows: the same windows as one process with batch
    ``world_size * b`` (each rank only reads its own rows).
    """

    _SPLITS = {"train": 0, "val": 1}

    def __init__(
        self,
        sources: Sequence[SourceTokens],
        *,
        seq_len: int,
        batch_size: int,
        seed: int,
        split: str = "train",
        rank: int = 0,
        world_size: int = 1,
        sampling: str = "random",
    ):
        if not 0 <= rank < world_size:
            raise Phase7Error(f"data sampler: rank {rank} is outside a world of {world_size} processes")
        self.arrays = [getattr(s, split) for s in sources]
        keep = [i for i, a in enumerate(self.arrays) if len(a) > seq_len]
        if not keep:
            raise Phase7Error(f"no data source has a {split} split of more than {seq_len} tokens")
        self.arrays = [self.arrays[i] for i in keep]
        self.labels = [sources[i].label for i in keep]
        self.bytes_per_token = [getattr(sources[i], "bytes_per_token", None) for i in keep]
        weights = np.asarray([sources[i].weight for i in keep], dtype=np.float64)
        self.probs = weights / weights.sum()
        self.seq_len, self.batch_size = seq_len, batch_size
        self.seed, self.split, self.rank, self.world_size = seed, split, rank, world_size
        if sampling not in ("random", "epochs"):
            raise Phase7Error(f"data.sampling must be 'random' or 'epochs', got {sampling!r}")
        self.sampling = sampling
        self.position = 0  # index of the next batch
        # epochs: draws of each source in batches before an index, kept every _EVERY batches so
        # that any batch is found by replaying at most _EVERY source choices
        self._counts_at = {0: np.zeros(len(self.arrays), dtype=np.int64)}
        self._last = (0, self._counts_at[0])
        self._epochs: dict[tuple[int, int], tuple[int, np.ndarray, int]] = {}

    _EVERY = 1024

    def _sources(self, index: int) -> tuple[np.random.Generator, np.ndarray]:
        rng = np.random.default_rng([self.seed, self._SPLITS[self.split], 0, index])
        return rng, rng.choice(len(self.arrays), size=self.batch_size * self.world_size, p=self.probs)

    def _draw(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Source and start offset of every row of the global batch ``index``."""
        rng, which = self._sources(index)
        window = self.seq_len + 1
        if self.sampling == "epochs":
            starts = self._epoch_starts(index, which)
        else:
            starts = np.asarray([rng.integers(0, len(self.arrays[s]) - window + 1) for s in which], dtype=np.int64)
        return which[self._mine], starts[self._mine]

    @property
    def _mine(self) -> slice:
        """This rank's rows of a global batch."""
        return slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)

    def _counts_before(self, index: int) -> np.ndarray:
        """How many rows each source gave in batches 0 .. index-1."""
        if len(self.arrays) == 1:
            return np.asarray([index * self.batch_size * self.world_size], dtype=np.int64)
        base = max(i for i in self._counts_at if i <= index)
        counts = self._counts_at[base]
        if base < self._last[0] <= index:  # reading in order: one batch's choices, not _EVERY
            base, counts = self._last
        counts = counts.copy()
        for i in range(base, index):
            counts += np.bincount(self._sources(i)[1], minlength=len(self.arrays))
            if (i + 1) % self._EVERY == 0:
                self._counts_at.setdefault(i + 1, counts.copy())
        self._last = (index, counts.copy())
        return counts

    def _epoch_starts(self, index: int, which: np.ndarray) -> np.ndarray:
        """The k-th row drawn from a source takes window k of its shuffled epochs."""
        counts = self._counts_before(index)
        starts = np.empty(len(which), dtype=np.int64)
        for r, s in enumerate(which):
            n_windows, order, phase = self._epoch(int(s), int(counts[s]) // self._n_windows(s))
            starts[r] = phase + order[counts[s] % n_windows] * self.seq_len
            counts[s] += 1
        return starts

    def _n_windows(self, s: int) -> int:
        return (len(self.arrays[s]) - self.seq_len - 1) // self.seq_len + 1

    def _epoch(self, s: int, epoch: int) -> tuple[int, np.ndarray, int]:
        """Source s's epoch: (windows, their order, the phase of the window grid)."""
        key = (s, epoch)
        if key not in self._epochs:
            if len(self._epochs) >= 2 * len(self.arrays):  # a source's current and next epoch
                self._epochs.clear()
            n = self._n_windows(s)
            slack = len(self.arrays[s]) - self.seq_len - 1 - (n - 1) * self.seq_len  # 0 .. seq_len - 1
            rng = np.random.default_rng([self.seed, self._SPLITS[self.split], 1, s, epoch])
            self._epochs[key] = (n, rng.permutation(n), int(rng.integers(0, slack + 1)))
        return self._epochs[key]

    def batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        which, starts = self._draw(index)
        window = self.seq_len + 1
        rows = np.empty((self.batch_size, window), dtype=np.int64)
        for r, (s, start) in enumerate(zip(which, starts)):
            rows[r] = self.arrays[s][start : start + window]  # reads one window of a memmap
        t = torch.from_numpy(rows)
        return t[:, :-1], t[:, 1:]

    def batch_bytes(self, index: int) -> float | None:
        """UTF-8 bytes of text behind the targets of batch ``index`` (seq_len tokens a row, each
        row at its source's bytes-per-token ratio); None when a row's source has no ratio."""
        ratios = [self.bytes_per_token[s] for s in self.source_of_rows(index)]
        if any(r is None for r in ratios):
            return None
        return float(sum(ratios)) * self.seq_len

    def source_of_rows(self, index: int) -> np.ndarray:
        """Which source each row of batch ``index`` came from (no offsets drawn)."""
        return self._sources(index)[1][self._mine]

    def __iter__(self):
        return self

    def __next__(self):
        out = self.batch(self.position)
        self.position += 1
        return out

    def state_dict(self) -> dict:
        return {"position": self.position, "seed": self.seed, "split": self.split, "rank": self.rank,
                "world_size": self.world_size, "sampling": self.sampling}

    def load_state_dict(self, state: dict) -> None:
        if state.get("seed") != self.seed:
            raise Phase7Error(f"data sampler seed {state.get('seed')} in the checkpoint differs from run.seed {self.seed}")
        # a position means other windows under the other sampler: resuming would silently change
        # the data order (checkpoints from before "epochs" existed have no key: "random")
        saved = state.get("sampling", "random")
        if saved != self.sampling:
            raise Phase7Error(
                f"the checkpoint's data order was drawn with data.sampling = {saved!r}, the recipe now says"
                f" {self.sampling!r}; resume with --set data.sampling='\"{saved}\"' (or start a new run)")
        self.position = int(state["position"])
