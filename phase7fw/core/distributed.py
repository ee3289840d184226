"""Multi-process training on torch.distributed: torchrun environment, DDP, FSDP2, DCP.

Launch: ``torchrun --nproc_per_node N -m phase7fw run RECIPE`` with ``[parallel] strategy =
"ddp"`` or ``"fsdp"``. torchrun sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR; the process group
uses NCCL on CUDA and gloo on CPU. Composition order (torchtitan's): activation
checkpointing -> compile -> sharding.

Both strategies wrap a :class:`LossModule` (``forward(x, y) = model.loss(x, y)``), so the
wrapper's forward hooks (DDP's reducer, FSDP's unshard) run for the training loss, not only
for ``model.forward``.
"""

from __future__ import annotations

import contextlib
import datetime
import os

import attrs
import torch
import torch.distributed as dist
from torch import nn

from phase7fw.errors import Phase7Error


@attrs.frozen
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    strategy: str = "none"

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init(strategy: str, device_name: str) -> tuple[DistContext, str]:
    """Set up the process group from the torchrun environment; returns the context and the
    device name this rank must use (``cuda:<local_rank>`` on GPUs)."""
    world = env_world_size()
    if strategy == "none":
        if world > 1:
            raise Phase7Error(
                f"launched on {world} processes but parallel.strategy is \"none\";"
                " set --set parallel.strategy=\"ddp\" (or \"fsdp\")"
            )
        return DistContext(), device_name
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if "MASTER_ADDR" not in os.environ and world == 1:
        # A single process with strategy ddp/fsdp (e.g. a quick test): a group of one.
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
    use_cuda = device_name != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device_name = f"cuda:{local_rank}"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=10))
    return DistContext(rank, world, local_rank, strategy), device_name


def shutdown(wait_for_peers: bool = False) -> None:
    """Leave the process group. ``wait_for_peers`` (every rank finished its command): a barrier
    first, because a rank that tears down while another still talks to it (gloo's pair
    threads) can make that rank abort ("terminate called without an active exception"). Not
    after an error: the other ranks may never get there (torchrun stops them instead)."""
    if dist.is_available() and dist.is_initialized():
        if wait_for_peers:
            try:
                dist.barrier()
            except Exception:  # noqa: BLE001 - a peer is already gone: tear down anyway
                pass
        dist.destroy_process_group()


class LossModule(nn.Module):
    """The training loss as a module's forward, so DDP/FSDP hooks wrap it."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor):
        return self.model.loss(input_ids, targets)


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The modules FSDP shards and torch.compile compiles one by one: ``model.blocks``."""
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise Phase7Error(f"parallel.strategy = \"fsdp\" needs a model with .blocks; {type(model).__name__} has none")
    return list(blocks)


def wrap(model: nn.Module, ctx: DistContext, precision: str, device: torch.device) -> nn.Module:
    """Wrap ``LossModule(model)`` for the strategy; returns the module to call as the loss."""
    loss_module = LossModule(model)
    if ctx.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [device.index] if device.type == "cuda" else None
        return DDP(loss_module, device_ids=ids)
    if ctx.strategy == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        # Parameters stay fp32 (the optimizer's master copy); compute dtype follows the recipe.
        compute = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        mp = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32) if compute else MixedPrecisionPolicy()
        for unit in shard_units(model):
            fully_shard(unit, mp_policy=mp)
        fully_shard(loss_module, mp_policy=mp)
        return loss_module
    return loss_module


@contextlib.contextmanager
def gradient_sync(wrapped: nn.Module, ctx: DistContext, enabled: bool):
    """Skip the gradient all-reduce on non-final micro-batches (DDP no_sync / FSDP2 flag)."""
    if not ctx.distributed or enabled:
        if ctx.strategy == "fsdp" and ctx.distributed:
            wrapped.set_requires_gradient_sync(True)
        yield
        return
    if ctx.strategy == "ddp":
        with wrapped.no_sync():
            yield
    else:
        wrapped.set_requires_gradient_sync(False)
        yield


def all_mean(value: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Mean over ranks (every rank gets the same number, so they all decide alike)."""
    if ctx.distributed:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= ctx.world_size
    return value


def full_norm(norm) -> torch.Tensor:
    """clip_grad_norm_ returns a DTensor under FSDP2: make it a plain tensor."""
    full = getattr(norm, "full_tensor", None)
    return full() if callable(full) else norm


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()


def broadcast_tensor(tensor: torch.Tensor, ctx: DistContext) -> None:
    """Rank 0's values into ``tensor`` on every rank, in place."""
    if ctx.distributed:
        dist.broadcast(tensor, src=0)


def broadcast_object(obj, ctx: DistContext):
    if not ctx.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
