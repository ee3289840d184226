"""The recipe schema: frozen attrs classes for the fixed tables of a recipe.

Component tables (``[model]``, ``[optimizer]``, ``[[data.sources]]``, ...) hold a ``name``
and that component's own options; their schema is the ``config_cls`` the component was
registered with.
"""

from __future__ import annotations

from typing import Literal

import attrs

from phase7fw.recipe.options import Component, component, in_range, non_negative, option, positive

KERNEL_OPS = ("hyperbolic_attention", "ar_ssm_scan", "htt_embedding", "rmsnorm", "swiglu", "cross_entropy")
KernelChoice = Literal["triton", "reference", "auto"]


@attrs.frozen
class RunSection:
    name: str = option("run", help="run name; also names the default output directory")
    output_dir: str = option("", help="where logs and checkpoints go (default: runs/<name>)")
    seed: int = option(0, check=non_negative, help="seed for init, data order and sampling")


@attrs.frozen
class TrainSection:
    max_steps: int = option(1000, check=positive, help="optimizer steps")
    batch_size: int = option(8, check=positive, help="sequences per micro-batch")
    grad_accum_steps: int = option(1, check=positive, help="micro-batches per optimizer step")
    precision: Literal["bf16", "fp16", "fp32"] = option("fp32", help="autocast dtype (fp16 uses a grad scaler)")
    grad_clip: float = option(1.0, check=non_negative, help="max global grad norm; 0 disables clipping")
    activation_checkpointing: bool = option(False, help="recompute block activations in backward")
    compile: bool = option(False, help="torch.compile the model for training")
    log_every: int = option(10, check=positive, help="console/tracker line every N steps")
    eval_every: int = option(0, check=non_negative, help="validate every N steps (0: only at the end)")
    eval_batches: int = option(8, check=positive, help="validation batches per evaluation")
    save_every: int = option(0, check=non_negative, help="write <model>_step_N.pt every N steps (0: off)")
    max_nonfinite_steps: int = option(
        10, check=positive, help="stop after this many skipped non-finite steps in a row"
    )
    device: str = option("auto", help='"auto" (cuda if available), "cpu", "cuda", "cuda:1", ...')


@attrs.frozen
class DataSection:
    tokenizer: Component = component("tokenizer", {"name": "bytes"})
    sources: list[Component] = component("data_source", many=True)
    val_fraction: float = option(
        0.05, check=in_range(0.0, 0.5, hi_open=True), help="tail of each source held out for validation"
    )
    cache_dir: str = option("", help="tokenized data cache (default: ~/.cache/phase7fw)")


@attrs.frozen
class KernelsSection:
    hyperbolic_attention: KernelChoice = "reference"
    ar_ssm_scan: KernelChoice = "reference"
    htt_embedding: KernelChoice = "reference"
    rmsnorm: KernelChoice = "reference"
    swiglu: KernelChoice = "reference"
    cross_entropy: KernelChoice = "reference"


@attrs.frozen
class ParallelSection:
    strategy: Literal["none", "ddp", "fsdp"] = "none"


@attrs.frozen
class Recipe:
    run: RunSection = attrs.Factory(RunSection)
    model: Component = component("model", {"name": "llama"})
    optimizer: Component = component("optimizer", {"name": "adamw"})
    lr_scheduler: Component = component("lr_scheduler", {"name": "warmup_cosine"})
    curvature_scheduler: Component | None = component("curvature_scheduler", None)
    train: TrainSection = attrs.Factory(TrainSection)
    data: DataSection = attrs.Factory(DataSection)
    kernels: KernelsSection = attrs.Factory(KernelsSection)
    trackers: list[Component] = component("tracker", many=True)
    callbacks: list[Component] = component("callback", many=True)
    parallel: ParallelSection = attrs.Factory(ParallelSection)

    @property
    def output_dir(self) -> str:
        return self.run.output_dir or f"runs/{self.run.name}"
