"""Splitting a model's parameters into weight-decay and no-decay groups."""

from torch import nn

# Dotted-name parts that mark a parameter as a gain/offset rather than a weight matrix.
_NO_DECAY_MARKERS = ("norm", "bias", "scale")


def _no_decay(name: str, param: nn.Parameter) -> bool:
    if param.dim() < 2:
        return True  # biases, norm gains, per-head scalars
    return any(marker in part.lower() for part in name.split(".") for marker in _NO_DECAY_MARKERS)


def param_groups(model: nn.Module) -> list[dict]:
    """``[{"params": decayed}, {"params": not_decayed, "weight_decay": 0.0}]``.

    Matrices (2-D and up) are decayed; 1-D/0-D parameters and anything whose name looks like
    a norm, bias or (embedding) scale are not. Frozen parameters are left out. Both groups
    are always present (possibly empty) so the optimizer state layout does not depend on
    the model.
    """
    decay, no_decay = [], []
    for name, param in model.named_parameters():  # shared (tied) parameters appear once
        if not param.requires_grad:
            continue
        (no_decay if _no_decay(name, param) else decay).append(param)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
