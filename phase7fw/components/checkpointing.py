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
import types

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
    """How a model's blocks are checkpointed (``model.checkpointing`` holds one, or None when
    off). :meth:`attach` makes each covered block checkpoint itself, inside its own forward:
    a block that ``train.compile`` compiles then traces the checkpoint into its graph, so the
    compiled backward recomputes what it needs (fused with the backward's own kernels)
    instead of rerunning the compiled forward from eager code, and CUDA-graph compile modes
    see one forward and one backward per block (torchtitan's order: checkpoint, then compile)."""

    def __init__(self, policy: str = "full", every: int = 1):
        if policy not in POLICIES:
            raise ValueError(f"checkpoint policy must be one of {', '.join(POLICIES)}, got {policy!r}")
        if every < 1:
            raise ValueError(f"checkpoint_every must be >= 1, got {every}")
        self.policy, self.every = policy, every
        self._context = None
        if policy == "save_matmuls":
            self._context = functools.partial(create_selective_checkpoint_contexts, _save_matmuls)

    def covers(self, i: int) -> bool:
        """Whether block ``i`` is checkpointed (every ``every``-th, from the first)."""
        return i % self.every == 0

    def attach(self, blocks) -> "BlockCheckpointing":
        """Give each covered block of ``blocks`` a forward (an instance attribute, so its
        parameters and state-dict names do not change) that runs the class's forward under
        checkpoint while it trains with gradients, and plainly otherwise (evaluation keeps
        nothing anyway). Returns self."""
        for i, block in enumerate(blocks):
            if self.covers(i):
                block.forward = types.MethodType(self.run, block)
        return self

    def run(self, block, *args):
        """``block``'s class forward on ``args``: under checkpoint (with this policy) while the
        block trains with gradients, plainly otherwise."""
        forward = type(block).forward
        if not (block.training and torch.is_grad_enabled()):
            return forward(block, *args)
        if self._context is None:
            return checkpoint(forward, block, *args, use_reentrant=False)
        return checkpoint(forward, block, *args, use_reentrant=False, context_fn=self._context)
