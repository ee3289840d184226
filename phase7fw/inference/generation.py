"""Sampling next tokens (temperature, top-k, top-p, repetition penalty) and the text-level
generation loop (stop strings, streaming)."""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Iterable

import torch

from phase7fw.errors import Phase7Error


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Make tokens already in ``seen`` less likely whatever the sign of their logit:
    positive logits are divided by ``penalty``, negative ones multiplied by it."""
    if penalty == 1.0 or seen.numel() == 0:
        return logits
    out = logits.clone()
    picked = out.gather(-1, seen)
    out.scatter_(-1, seen, torch.where(picked > 0, picked / penalty, picked * penalty))
    return out


def filter_top_k_top_p(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Set to -inf every logit outside the top-k and outside the smallest set of tokens whose
    probability mass reaches top-p (the most likely token always stays)."""
    out = logits
    if top_k is not None and 0 < top_k < out.size(-1):
        kth = torch.topk(out, top_k, dim=-1).values[..., -1:]
        out = out.masked_fill(out < kth, float("-inf"))
    if top_p is not None and 0.0 < top_p < 1.0:
        sorted_logits, order = torch.sort(out, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = probs.cumsum(-1) - probs  # mass of strictly more likely tokens
        drop_sorted = mass_before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        out = out.masked_fill(drop, float("-inf"))
    return out


def sample_next(
    logits: torch.Tensor,
    *,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    repetition_penalty: float,
    seen: torch.Tensor,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """One token id per row of ``logits`` (batch, vocab); temperature 0 is greedy."""
    logits = apply_repetition_penalty(logits.float(), seen, repetition_penalty)
    if temperature <= 0:
        return logits.argmax(-1)
    logits = filter_top_k_top_p(logits / temperature, top_k, top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# ----------------------------------------------------------------------------- settings
@dataclasses.dataclass
class SamplingParams:
    """What ``generate`` and ``chat`` sample with; :meth:`checked` validates it."""

    max_new_tokens: int = 64
    temperature: float = 0.8
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    seed: int | None = None

    def checked(self) -> "SamplingParams":
        problems = []
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 0:
            problems.append(f"max_new_tokens must be an integer >= 0, got {self.max_new_tokens!r}")
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature) and self.temperature >= 0):
            problems.append(f"temperature must be >= 0 (0 = greedy) and finite, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            problems.append(f"top_k must be >= 1 (or none), got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            problems.append(f"top_p must be in (0, 1] (or none), got {self.top_p}")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            problems.append(f"repetition_penalty must be > 0 (1 = off) and finite, got {self.repetition_penalty}")
        if problems:
            raise Phase7Error("; ".join(problems))
        return self

    def with_setting(self, name: str, text: str) -> "SamplingParams":
        """A copy with ``name`` set from a string (``/set top_k 40``; ``none`` clears an option)."""
        name = name.replace("-", "_")
        fields = {f.name: f for f in dataclasses.fields(self)}
        if name not in fields:
            raise Phase7Error(f"unknown setting {name!r}; settings: {', '.join(fields)}")
        kind = int if name in ("max_new_tokens", "top_k", "seed") else float
        if text.lower() in ("none", "off") and name in ("top_k", "top_p", "seed"):
            value = None
        else:
            try:
                value = kind(text)
            except ValueError:
                raise Phase7Error(f"{name} expects {'an integer' if kind is int else 'a number'}, got {text!r}") from None
        return dataclasses.replace(self, **{name: value}).checked()

    def describe(self) -> str:
        return " ".join(f"{k}={v}" for k, v in dataclasses.asdict(self).items())


# ----------------------------------------------------------------------------- stop strings
def _held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters of ``text`` must not be shown yet: an incomplete UTF-8
    character (decoded as U+FFFD) or the beginning of a stop string."""
    hold = 0
    while hold < min(3, len(text)) and text[len(text) - 1 - hold] == "\ufffd":
        hold += 1
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), hold, -1):
            if text.endswith(stop[:n]):
                hold = n
                break
    return hold


def _find_stop(text: str, stops: list[str]) -> int | None:
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def generate_text(
    decoder,
    tokenizer,
    params: SamplingParams,
    *,
    stop: str | Iterable[str] | None = None,
    on_text: Callable[[str], None] | None = None,
    generator: torch.Generator | None = None,
) -> str:
    """Sample up to ``params.max_new_tokens`` tokens after ``decoder``'s sequence (which grows
    with them) and return the new text. Generation ends at the end-of-document token or at the
    first stop string (which is not returned). ``on_text`` receives the text as it becomes
    final (streaming): never a piece of a stop string or half of a UTF-8 character."""
    stops = [stop] if isinstance(stop, str) else [s for s in (stop or ()) if s]
    if generator is None and params.seed is not None:
        generator = torch.Generator(device=decoder.device).manual_seed(params.seed)
    vocab = tokenizer.vocab_size
    new_ids: list[int] = []
    text, shown = "", 0

    def emit(upto: int) -> None:
        nonlocal shown
        if on_text is not None and upto > shown:
            on_text(text[shown:upto])
        shown = max(shown, upto)

    for _ in range(params.max_new_tokens):
        logits = decoder.logits()[:, :vocab]
        seen = torch.tensor([decoder.visible()], device=logits.device)
        token = int(sample_next(logits, temperature=params.temperature, top_k=params.top_k, top_p=params.top_p,
                                repetition_penalty=params.repetition_penalty, seen=seen, generator=generator))
        if token == tokenizer.eos_id:
            break
        decoder.extend([token])
        new_ids.append(token)
        text = tokenizer.decode(new_ids)
        cut = _find_stop(text, stops) if stops else None
        if cut is not None:
            text = text[:cut]
            break
        emit(len(text) - _held_back(text, stops))
    emit(len(text))
    return text
