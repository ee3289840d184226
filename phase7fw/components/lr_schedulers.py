"""Built-in LR schedulers, stepped once per optimizer step.

``s`` below is the number of optimizer steps already taken, so the first step runs at
``lr(0)``. Each scheduler's value is a closed-form function of ``s``; the state saved in a
checkpoint is just ``s`` and the base learning rates.

- ``warmup_cosine``: ``lr * (s+1)/W`` for ``s < W``, then a half cosine from ``lr`` down to
  ``min_lr``, reached at ``s = max_steps`` and kept after.
- ``constant``: the same linear warm-up, then ``lr``.

``replan(max_steps)`` moves a resumed schedule to a new ``train.max_steps`` (the engine calls
it when the recipe's step count differs from the checkpoint's).

With several parameter groups each group is scaled from its own initial lr; ``min_lr`` is
absolute for the optimizer's default lr and proportional for groups with another lr.
"""

# No ``from __future__ import annotations``: the recipe converter reads the real field types.

import math

import attrs
import torch
from torch.optim.lr_scheduler import LRScheduler

from phase7fw.errors import Phase7Error
from phase7fw.hookspecs import hookimpl
from phase7fw.recipe.options import non_negative, option


def warmup_factor(step: int, warmup_steps: int) -> float:
    return (step + 1) / warmup_steps


def cosine_factor(step: int, warmup_steps: int, max_steps: int, min_ratio: float) -> float:
    """Multiplier of the base lr: warm-up, then cosine from 1 to ``min_ratio``."""
    if step < warmup_steps:
        return warmup_factor(step, warmup_steps)
    decay_steps = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def constant_factor(step: int, warmup_steps: int) -> float:
    return warmup_factor(step, warmup_steps) if step < warmup_steps else 1.0


class _FactorScheduler(LRScheduler):
    """Sets every group's lr to ``base_lr * self.factor(step)``; subclasses give ``factor``.

    Only plain numbers live on the instance, so the inherited ``state_dict`` round-trips.
    """

    def factor(self, step: int) -> float:
        raise NotImplementedError

    def get_lr(self):
        f = self.factor(self.last_epoch)
        return [base_lr * f for base_lr in self.base_lrs]

    def replan(self, max_steps: int) -> None:
        """Continue on a schedule planned for ``max_steps`` (a resumed run whose
        ``train.max_steps`` changed): the current step stays, the lr follows the new plan."""
        if hasattr(self, "max_steps"):
            self.max_steps = max_steps
        values = self.get_lr()
        for group, lr in zip(self.optimizer.param_groups, values):
            group["lr"] = lr
        self._last_lr = values


class WarmupCosineLR(_FactorScheduler):
    def __init__(self, optimizer, *, warmup_steps: int, max_steps: int, min_ratio: float):
        self.warmup_steps, self.max_steps, self.min_ratio = warmup_steps, max_steps, min_ratio
        super().__init__(optimizer)

    def factor(self, step: int) -> float:
        return cosine_factor(step, self.warmup_steps, self.max_steps, self.min_ratio)


class ConstantLR(_FactorScheduler):
    def __init__(self, optimizer, *, warmup_steps: int):
        self.warmup_steps = warmup_steps
        super().__init__(optimizer)

    def factor(self, step: int) -> float:
        return constant_factor(step, self.warmup_steps)


@attrs.frozen
class WarmupCosineConfig:
    warmup_steps: int = option(100, check=non_negative, help="linear warm-up steps")
    min_lr: float = option(0.0, check=non_negative, help="absolute lr reached at train.max_steps")


@attrs.frozen
class ConstantConfig:
    warmup_steps: int = option(0, check=non_negative, help="linear warm-up steps")


def _optimizer_lr(optimizer: torch.optim.Optimizer) -> float:
    lr = optimizer.defaults.get("lr", optimizer.param_groups[0]["lr"])
    return float(lr)


def build_warmup_cosine(config: WarmupCosineConfig, *, optimizer, max_steps: int, **context) -> WarmupCosineLR:
    lr = _optimizer_lr(optimizer)
    if config.min_lr > lr:
        raise Phase7Error(f"lr_scheduler.min_lr ({config.min_lr:g}) is larger than the optimizer's lr ({lr:g})")
    min_ratio = config.min_lr / lr if lr > 0 else 0.0
    return WarmupCosineLR(optimizer, warmup_steps=config.warmup_steps, max_steps=max_steps, min_ratio=min_ratio)


def build_constant(config: ConstantConfig, *, optimizer, **context) -> ConstantLR:
    return ConstantLR(optimizer, warmup_steps=config.warmup_steps)


@hookimpl
def register_components(register):
    register(
        "lr_scheduler",
        "warmup_cosine",
        build_warmup_cosine,
        WarmupCosineConfig,
        description="linear warm-up, then cosine to min_lr at max_steps; context: optimizer, max_steps",
    )
    register(
        "lr_scheduler",
        "constant",
        build_constant,
        ConstantConfig,
        description="linear warm-up, then the optimizer's lr; context: optimizer",
    )
