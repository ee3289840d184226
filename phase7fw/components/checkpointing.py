"""Activation checkpointing of a model's blocks, shared by the built-in models.

``train.activation_checkpointing = true`` recomputes blocks in backward instead of keeping their
activations; two recipe keys say how much:

- ``train.checkpoint_policy``: ``"full"`` keeps only each checkpointed block's input and
  recomputes everything; ``"save_matmuls"`` (selective checkpointing) also keeps the outputs of
  the matmuls and of the sequence-mixing kernels (attention, scan), and recomputes only the cheap
  elementwise work between them: more memory than ``full``, and backward no longer reruns the
  block's matmuls.
- ``train.checkpoint_every``: checkpoint every N-th block (1: all of them); the others keep all
  their activations.

docs/performance.md ("Memory / small-GPU mode") has the measured bytes of each setting.
"""

from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

POLICIES: tuple[str, ...] = ("full", "save_matmuls")

_aten = torch.ops.aten
_SAVED_ATEN = {
    _aten.mm.default, _aten.addmm.default, _aten.bmm.default, _aten.baddbmm.default,
    _aten._scaled_dot_product_flash_attention.default,
    _aten._scaled_dot_product_efficient_attention.default,
    _aten._scaled_dot_product_cudnn_attention.default,
    _aten._scaled_dot_product_flash_attention_for_cpu.default,
}
# the forward ops of the sequence mixers' Triton kernels (phase7fw/kernels/<op>/): each costs
# far more than the elementwise work around it
_SAVED_CUSTOM = ("hyperbolic_attention_fwd", "ar_ssm_scan_fwd", "hyperbolic_linear_attention_fwd")


def _save_matmuls(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    if op in _SAVED_ATEN:
        return CheckpointPolicy.MUST_SAVE
    if getattr(op, "namespace", None) == "phase7fw" and op._opname in _SAVED_CUSTOM:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


class BlockCheckpointing:
    """Runs block ``i`` of a model, checkpointed or not (``model.checkpointing`` holds one, or
    None when off). Only in training with gradients on: evaluation keeps nothing anyway."""

    def __init__(self, policy: str = "full", every: int = 1):
        if policy not in POLICIES:
            raise ValueError(f"checkpoint policy must be one of {', '.join(POLICIES)}, got {policy!r}")
        if every < 1:
            raise ValueError(f"checkpoint_every must be >= 1, got {every}")
        self.policy, self.every = policy, every
        self._context = None
        if policy == "save_matmuls":
            self._context = functools.partial(create_selective_checkpoint_contexts, _save_matmuls)

    def __call__(self, i: int, block, *args):
        if i % self.every:
            return block(*args)
        if self._context is None:
            return checkpoint(block, *args, use_reentrant=False)
        return checkpoint(block, *args, use_reentrant=False, context_fn=self._context)


def run_block(model, i: int, block, *args):
    """Block ``i`` under ``model.checkpointing`` when the model trains with gradients."""
    ckpt = getattr(model, "checkpointing", None)
    if ckpt and model.training and torch.is_grad_enabled():
        return ckpt(i, block, *args)
    return block(*args)
