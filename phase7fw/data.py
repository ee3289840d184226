"""Token streams of the data mix and the sampler that cuts training windows from them.

Each source's tokens are split into a training part and a held-out validation tail
(``data.val_fraction``). The :class:`MixtureSampler` draws each window's source by weight
and its offset uniformly, from a random generator seeded by (seed, split, rank, batch index):
batch ``i`` is the same whatever happened before it, so resuming only needs the index.
"""

from __future__ import annotations

from typing import Sequence

import attrs
import numpy as np
import torch

from phase7fw.errors import Phase7Error


@attrs.define
class SourceTokens:
    label: str
    weight: float
    train: np.ndarray
    val: np.ndarray


def split_tokens(label: str, weight: float, tokens: np.ndarray, val_fraction: float, window: int) -> SourceTokens:
    """Hold out the last ``val_fraction`` of a source; both parts must fit one window."""
    n_val = int(len(tokens) * val_fraction)
    train, val = tokens[: len(tokens) - n_val], tokens[len(tokens) - n_val :]
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


class MixtureSampler:
    """Batches of (input, target) windows drawn from several sources by weight."""

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
    ):
        self.arrays = [getattr(s, split) for s in sources]
        keep = [i for i, a in enumerate(self.arrays) if len(a) > seq_len]
        if not keep:
            raise Phase7Error(f"no data source has a {split} split of more than {seq_len} tokens")
        self.arrays = [self.arrays[i] for i in keep]
        self.labels = [sources[i].label for i in keep]
        weights = np.asarray([sources[i].weight for i in keep], dtype=np.float64)
        self.probs = weights / weights.sum()
        self.seq_len, self.batch_size = seq_len, batch_size
        self.seed, self.split, self.rank = seed, split, rank
        self.position = 0  # index of the next batch

    def batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, self._SPLITS[self.split], self.rank, index])
        which = rng.choice(len(self.arrays), size=self.batch_size, p=self.probs)
        window = self.seq_len + 1
        rows = np.empty((self.batch_size, window), dtype=np.int64)
        for r, s in enumerate(which):
            start = rng.integers(0, len(self.arrays[s]) - window + 1)
            rows[r] = self.arrays[s][start : start + window]
        t = torch.from_numpy(rows)
        return t[:, :-1], t[:, 1:]

    def source_of_rows(self, index: int) -> np.ndarray:
        """Which source each row of batch ``index`` came from (for tests and stats)."""
        rng = np.random.default_rng([self.seed, self._SPLITS[self.split], self.rank, index])
        return rng.choice(len(self.arrays), size=self.batch_size, p=self.probs)

    def __iter__(self):
        return self

    def __next__(self):
        out = self.batch(self.position)
        self.position += 1
        return out

    def state_dict(self) -> dict:
        return {"position": self.position, "seed": self.seed, "split": self.split, "rank": self.rank}

    def load_state_dict(self, state: dict) -> None:
        if state.get("seed") != self.seed:
            raise Phase7Error(f"data sampler seed {state.get('seed')} in the checkpoint differs from run.seed {self.seed}")
        self.position = int(state["position"])
