"""The recipe schema: frozen attrs classes for the fixed tables of a recipe.

Component tables (``[model]``, ``[optimizer]``, ``[[data.sources]]``, ...) hold a ``name``
and that component's own options; their schema is the ``config_cls`` the component was
registered with.
"""

from __future__ import annotations

from typing import Literal

import attrs

from phase7fw.recipe.options import Component, KernelChoice, component, in_range, non_negative, option, positive



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
    precision: Literal["bf16", "fp16", "fp32", "auto"] = option(
        "fp32", help='autocast dtype (fp16 uses a grad scaler); "auto": bf16 on a GPU that has it, else fp32'
    )
    grad_clip: float = option(1.0, check=non_negative, help="max global grad norm; 0 disables clipping")
    activation_checkpointing: bool = option(False, help="recompute block activations in backward")
    checkpoint_policy: Literal["full", "save_matmuls"] = option(
        "full", help='with activation_checkpointing: "full" keeps each block\'s input only; "save_matmuls" also'
        " keeps matmul and attention/scan outputs and recomputes the elementwise work (more memory, less compute)"
    )
    checkpoint_every: int = option(
        1, check=positive, help="with activation_checkpointing: checkpoint every N-th block (1: all)"
    )
    compile: bool = option(False, help="torch.compile the model for training")
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = option(
        "default", help='torch.compile mode with compile = true; "reduce-overhead" replays each compiled block'
        " from a CUDA graph (less host work per micro-batch at small batches; on a GPU only)"
    )
    log_every: int = option(10, check=positive, help="console/tracker line every N steps")
    eval_every: int = option(0, check=non_negative, help="validate every N steps (0: only at the end)")
    eval_batches: int = option(8, check=positive, help="validation batches per evaluation")
    save_every: int = option(0, check=non_negative, help="write <model>_step_N.pt every N steps (0: off)")
    max_nonfinite_steps: int = option(
        10, check=positive, help="stop after this many skipped non-finite steps in a row"
    )
    device: str = option("auto", help='"auto" (cuda if available), "cpu", "cuda", "cuda:1", ...')
    # Memory switches (docs/performance.md, "Memory / small-GPU mode")
    param_dtype: Literal["fp32", "bf16"] = option(
        "fp32", help='dtype the weights live in; "bf16" needs precision = "bf16" and an optimizer that rounds'
        ' stochastically (adamw_lowmem)'
    )
    optimizer_in_backward: bool = option(
        False, help="update each parameter inside backward, so no gradient buffer exists (grad_accum_steps = 1)"
    )
    ce_chunk_tokens: int = option(
        0, check=non_negative, help="compute the cross-entropy over chunks of N tokens (0: all logits at once)"
    )
    # Fine-tuning (docs/finetune.md)
    init_from: str = option(
        "", help="start from the weights of this checkpoint, run folder or exported Hugging Face folder: step 0,"
        " fresh optimizer, LR schedule and data; [model] and [data.tokenizer] must be the source's"
    )
    freeze: list[str] = option(
        factory=list, help='parameters not to train, as name patterns (fnmatch): ["embedding.*", "blocks.0.*"]'
    )


@attrs.frozen
class DataSection:
    tokenizer: Component = component("tokenizer", {"name": "bytes"})
    sources: list[Component] = component("data_source", many=True)
    val_fraction: float = option(
        0.05, check=in_range(0.0, 0.5, hi_open=True), help="tail of each source held out for validation"
    )
    cache_dir: str = option("", help="tokenized data cache (default: ~/.cache/phase7fw)")
    sampling: Literal["random", "epochs"] = option(
        "random", help="training windows: random = uniform offsets (text may repeat long before a source is used"
        " up); epochs = each source cut into windows, shuffled, none repeated before the source is used up"
    )


@attrs.frozen
class ParallelSection:
    strategy: Literal["none", "ddp", "fsdp"] = "none"


def combination_errors(recipe: "Recipe") -> list[str]:
    """Problems that involve more than one key (checked after every key is valid)."""
    t, strategy, errors = recipe.train, recipe.parallel.strategy, []
    if t.optimizer_in_backward:
        if t.grad_accum_steps > 1:
            errors.append(
                f"train.optimizer_in_backward = true with train.grad_accum_steps = {t.grad_accum_steps}: the update runs"
                " inside backward, so there is no gradient buffer to sum micro-batches in; set"
                " train.grad_accum_steps = 1 (raise train.batch_size instead) or train.optimizer_in_backward = false"
            )
        if strategy != "none":
            errors.append(
                f"train.optimizer_in_backward = true with parallel.strategy = {strategy!r}: gradients are averaged"
                " across processes after backward, too late for updates inside it; use one of the two"
            )
        if t.precision == "fp16":
            errors.append(
                "train.optimizer_in_backward = true with train.precision = \"fp16\": the fp16 grad scaler needs all"
                " gradients before the update; use precision = \"bf16\""
            )
    if t.compile_mode != "default" and not t.compile:
        errors.append(
            f"train.compile_mode = {t.compile_mode!r} without train.compile = true: the mode is torch.compile's;"
            " set train.compile = true or leave compile_mode out"
        )
    if not t.activation_checkpointing and (t.checkpoint_policy, t.checkpoint_every) != ("full", 1):
        errors.append(
            f"train.checkpoint_policy = {t.checkpoint_policy!r} / train.checkpoint_every = {t.checkpoint_every}"
            " without train.activation_checkpointing = true: they choose how blocks are recomputed; set"
            " train.activation_checkpointing = true or leave them out"
        )
    if t.param_dtype == "bf16":
        if t.precision not in ("bf16", "auto"):
            errors.append(
                f"train.param_dtype = \"bf16\" with train.precision = {t.precision!r}: bf16 weights need bf16"
                " autocast; set train.precision = \"bf16\""
            )
        if strategy == "fsdp":
            errors.append("train.param_dtype = \"bf16\" with parallel.strategy = \"fsdp\": not supported (FSDP keeps"
                          " its own sharded weights); use \"none\" or \"ddp\"")
    return errors


@attrs.frozen
class Recipe:
    run: RunSection = attrs.Factory(RunSection)
    model: Component = component("model", {"name": "llama"})
    optimizer: Component = component("optimizer", {"name": "adamw"})
    lr_scheduler: Component = component("lr_scheduler", {"name": "warmup_cosine"})
    curvature_scheduler: Component | None = component("curvature_scheduler", None)
    train: TrainSection = attrs.Factory(TrainSection)
    data: DataSection = attrs.Factory(DataSection)
    #: ``[kernels]``: one :class:`KernelChoice` per registered op (``registry.kernel_ops()``),
    #: ``op = "triton" | "reference" | "auto"`` or ``[kernels.op] impl = ..., <tuning options>``
    kernels: dict[str, KernelChoice] = attrs.field(factory=dict, metadata={"kernels": True})
    trackers: list[Component] = component("tracker", many=True)
    callbacks: list[Component] = component("callback", many=True)
    parallel: ParallelSection = attrs.Factory(ParallelSection)

    @property
    def output_dir(self) -> str:
        return self.run.output_dir or f"runs/{self.run.name}"
