"""phase7fw-lion: an example phase7fw plugin that adds the Lion optimizer.

Lion (Chen et al., 2023, "Symbolic Discovery of Optimization Algorithms") keeps one
momentum buffer and moves every weight by exactly ``lr`` per step, in the direction of the
sign of an interpolation between that momentum and the current gradient:

    c = beta1 * m + (1 - beta1) * g
    w = w * (1 - lr * weight_decay) - lr * sign(c)      # decoupled weight decay
    m = beta2 * m + (1 - beta2) * g

Because every update has the same size, Lion usually wants a 3-10x smaller learning rate
and a 3-10x larger weight decay than AdamW.

Recipe usage, once this package is installed::

    [optimizer]
    name = "lion"
    lr = 3e-5
    weight_decay = 0.1
"""

# No `from __future__ import annotations`: phase7fw reads the config fields' types at runtime.

import attrs
import torch

from phase7fw import hookimpl
from phase7fw.recipe.options import each, in_range, non_negative, option, positive

__all__ = ["Lion", "LionConfig", "build_lion", "register_components"]


class Lion(torch.optim.Optimizer):
    """The Lion optimizer: sign of interpolated momentum, decoupled weight decay."""

    def __init__(self, params, lr: float = 1e-4, betas=(0.9, 0.99), weight_decay: float = 0.0):
        # Also checked here, not only in LionConfig, so direct users get the same errors.
        if not lr > 0:
            raise ValueError(f"Lion: lr must be > 0, got {lr!r}")
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"Lion: betas must be two values in [0, 1), got {betas!r}")
        if not weight_decay >= 0:
            raise ValueError(f"Lion: weight_decay must be >= 0, got {weight_decay!r}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, weight_decay = group["lr"], group["weight_decay"]
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("Lion does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                momentum = state["exp_avg"]
                if weight_decay != 0:
                    p.mul_(1 - lr * weight_decay)
                # lerp(a, b, t) = a + t * (b - a) = (1 - t) * a + t * b
                direction = momentum.lerp(p.grad, 1 - beta1).sign_()
                p.add_(direction, alpha=-lr)
                momentum.lerp_(p.grad, 1 - beta2)
        return loss


@attrs.frozen
class LionConfig:
    lr: float = option(1e-4, check=positive, help="step size (every weight moves by lr per step)")
    betas: tuple[float, float] = option(
        (0.9, 0.99),
        check=each(in_range(0.0, 1.0, hi_open=True)),
        help="(beta1: update interpolation, beta2: momentum decay)",
    )
    weight_decay: float = option(0.0, check=non_negative, help="decoupled weight decay (AdamW-style)")


def build_lion(config: LionConfig, *, params, **context) -> Lion:
    # ``params`` are parameter groups; a group's own weight_decay (0 for norms and biases)
    # takes precedence over the default given here.
    return Lion(params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)


@hookimpl
def register_components(register):
    register(
        "optimizer",
        "lion",
        build_lion,
        LionConfig,
        description="Lion: sign of interpolated momentum, decoupled weight decay (phase7fw-lion)",
    )
