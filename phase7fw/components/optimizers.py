"""Built-in optimizers. ``adamw``: torch's AdamW, fused on CUDA, foreach elsewhere."""

# No ``from __future__ import annotations``: the recipe converter reads the real field types.

import attrs
import torch

from phase7fw.errors import Phase7Error
from phase7fw.hookspecs import hookimpl
from phase7fw.recipe.options import each, in_range, non_negative, option, positive


@attrs.frozen
class AdamHyperparameters:
    """The options every AdamW flavour takes (``adamw``, ``adamw_lowmem``): defined once so
    their defaults, checks and help cannot drift apart. Subclasses add their own after these."""

    lr: float = option(3e-4, check=positive, help="peak learning rate (schedulers scale it)")
    betas: tuple[float, float] = option(
        (0.9, 0.95), check=each(in_range(0.0, 1.0, hi_open=True)), help="Adam moment decay rates"
    )
    eps: float = option(1e-8, check=positive, help="Adam denominator epsilon")
    weight_decay: float = option(0.1, check=non_negative, help="decoupled decay of the decay group")


@attrs.frozen
class AdamWConfig(AdamHyperparameters):
    fused: bool | None = option(None, help="fused CUDA kernel; unset = fused when all params are on CUDA")


def _tensors(params: list) -> list[torch.Tensor]:
    out = []
    for p in params:
        if isinstance(p, dict):
            group = p["params"]
            out.extend([group] if isinstance(group, torch.Tensor) else group)
        else:
            out.append(p)
    return out


def build_adamw(config: AdamWConfig, *, params, **context) -> torch.optim.AdamW:
    """``params``: parameter-group dicts (groups may override weight_decay, lr, ...) or an
    iterable of tensors. The config's values are the defaults of every group."""
    params = list(params)  # may be a generator; it is read twice
    tensors = _tensors(params)
    if not tensors:
        raise Phase7Error("optimizer adamw got no parameters to train")
    on_cuda = all(t.device.type == "cuda" for t in tensors)
    fused = config.fused
    if fused is None:
        fused = on_cuda
    elif fused and not on_cuda:
        devices = sorted({str(t.device) for t in tensors})
        raise Phase7Error(
            f"optimizer.fused = true needs every parameter on a CUDA device, got {', '.join(devices)};"
            " leave optimizer.fused unset to choose automatically"
        )
    return torch.optim.AdamW(
        params,
        lr=config.lr,
        betas=tuple(config.betas),
        eps=config.eps,
        weight_decay=config.weight_decay,
        fused=fused or None,
        foreach=None if fused else True,
    )


@hookimpl
def register_components(register):
    register(
        "optimizer",
        "adamw",
        build_adamw,
        AdamWConfig,
        description="AdamW (fused on CUDA, foreach otherwise); context: params (groups)",
    )
