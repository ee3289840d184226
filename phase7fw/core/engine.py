"""The Engine: builds every part of a run from a recipe, in one documented order.

Build order (``Engine.BUILD_ORDER``; each step is recorded in ``engine.build_steps``):

1. plugins         built-in and installed plugins fill the registry
2. recipe          the TOML recipe, validated strictly (overrides applied)
3. seed            torch's RNG seeded from ``run.seed`` (read from the recipe, so after it;
                   nothing before consumes torch's RNG)
4. tokenizer       built from ``[data.tokenizer]`` (or from the checkpoint's saved state; with
                   ``train.init_from``, from the source's: phase7fw/core/finetune.py)
5. kernels         ``[kernels]`` resolved to an implementation per op, with its tuning
                   (announced in the run header); then a training engine checks, on a
                   meta-device copy of the model built with them, that the checkpoint to
                   resume holds this model and that the run fits this machine
                   (phase7fw/core/preflight.py), before any data is read or memory allocated
6. data            sources loaded, tokenized, split into train/validation, mixture samplers
7. model           built on the meta device (no memory) from ``[model]`` with the chosen
                   kernels, checked against the model contract; weights cast to
                   ``train.param_dtype`` there (phase7fw/core/memory.py)
8. activation checkpointing   when ``train.activation_checkpointing``
9. compile         ``torch.compile`` of the training loss when ``train.compile``
10. parallel       ``[parallel]``: FSDP2 shards the meta model here (phase7fw/core/distributed.py);
                   DDP needs real weights, so it wraps right after step 11
11. materialize    parameters allocated on the device and initialized (seeded; with FSDP
                   rank 0's initial weights are copied into every rank's shards)
12. optimizer      from ``[optimizer]`` with decay / no-decay parameter groups (and its
                   backward hooks with ``train.optimizer_in_backward``)
13. schedulers     ``[lr_scheduler]`` and ``[curvature_scheduler]``
14. resume         leftovers of saves a killed run left half done cleaned up, then the
                   checkpoint loaded (``resume="auto"|"latest"|"never"|PATH``; a changed
                   ``train.max_steps`` re-plans the LR schedule), or else the weights of
                   ``train.init_from`` (a new run at step 0)
15. trackers       created when ``fit()`` starts (they must not exist for eval or chat);
                   ``fit()`` first takes the output folder's lock (phase7fw/core/run_lock.py)
16. loop           ``fit()``

Components are reached only through the registry; the engine never imports one by name.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from phase7fw import __version__
from phase7fw.core import distributed, finetune, memory, preflight, threads
from phase7fw.core.build import (
    build_model,
    build_tokenizer,
    cache_dir,
    materialize,
    model_vocab_size,
    resolve_device,
    resolve_precision,
)
from phase7fw.core.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    remove_interrupted_saves,
    save_checkpoint,
    save_sharded_checkpoint,
    upgrade_shapes,
)
from phase7fw.core.console import Console, bits_per_byte, human
from phase7fw.data.mixture import MixtureSampler, load_mix
from phase7fw.errors import CheckpointError, Phase7Error, RecipeError
from phase7fw.core.optim_groups import param_groups
from phase7fw.plugins import Plugins, load_plugins
from phase7fw.recipe import Recipe, load_recipe, recipe_to_dict, recipe_to_toml

BUILD_ORDER = (
    "plugins",
    "recipe",
    "seed",
    "tokenizer",
    "kernels",
    "data",
    "model",
    "activation_checkpointing",
    "compile",
    "parallel",
    "materialize",
    "optimizer",
    "schedulers",
    "resume",
    "trackers",
    "loop",
)


def planned_steps(state: dict) -> int | None:
    """The ``train.max_steps`` a checkpoint's run was planned for (older checkpoints: read
    from the recipe they hold)."""
    steps = state.get("max_steps")
    if isinstance(steps, int):
        return steps
    try:
        import tomllib

        steps = tomllib.loads(state.get("recipe") or "")["train"]["max_steps"]
    except (tomllib.TOMLDecodeError, KeyError, TypeError):
        return None
    return steps if isinstance(steps, int) else None


def check_buildable(recipe: Recipe, plugins: Plugins) -> None:
    """Build every part of a run that needs neither data nor a device -- tokenizer, model (on
    the meta device), its strategy and memory switches, optimizer, schedulers, data sources
    and callbacks -- so ``phase7fw recipe validate`` reports what ``run`` would (a
    :class:`Phase7Error`), in seconds and without memory."""
    from types import SimpleNamespace

    from phase7fw.data.mixture import build_sources

    tokenizer = build_tokenizer(recipe, plugins)
    model = build_model(recipe, "meta", plugins=plugins, vocab_size=model_vocab_size(recipe, tokenizer))
    check_strategy = getattr(model, "check_strategy", None)
    if callable(check_strategy):
        check_strategy(recipe.parallel.strategy)
    run = SimpleNamespace(recipe=recipe, model=model)
    memory.setup_model(run)
    memory.setup_checkpointing(run)
    registry, max_steps = plugins.registry, recipe.train.max_steps
    run.optimizer = registry.build("optimizer", recipe.optimizer.name, recipe.optimizer.config,
                                   params=param_groups(model))
    memory.setup_optimizer(run)
    registry.build("lr_scheduler", recipe.lr_scheduler.name, recipe.lr_scheduler.config, optimizer=run.optimizer,
                   max_steps=max_steps)
    if recipe.curvature_scheduler is not None:
        spec = recipe.curvature_scheduler
        model.set_curvature(registry.build("curvature_scheduler", spec.name, spec.config, max_steps=max_steps).value(0))
    build_sources(recipe, registry, cache_dir=cache_dir(recipe))
    for spec in recipe.callbacks:
        registry.build("callback", spec.name, spec.config)


class Engine:
    __doc__ = __doc__
    BUILD_ORDER = BUILD_ORDER

    def __init__(
        self,
        recipe: Recipe,
        *,
        plugins: Plugins,
        dummy_data: bool = False,
        resume: str = "auto",
        device: str | None = None,
        with_data: bool = True,
        checkpoint: dict | None = None,
        console: Console | None = None,
        allow_cpu: bool = False,
    ):
        self.build_steps: list[str] = []
        self.model_differences: list[str] = []  # model keys that differ from a resumed checkpoint's
        self.machine: dict = {}  # what the preflight estimated (phase7fw/core/preflight.py)
        self.console = console or Console()
        self.recipe = recipe
        self.plugins = plugins
        self.registry = plugins.registry
        self.step = 0
        self.best_val_loss = math.inf
        self.best_val_bpb: float | None = None
        self.last_val: dict = {}  # the latest evaluate() result with its step (model cards)
        self.skipped_steps = 0
        self.tokens_seen = 0
        self.tracker_state: dict = {}
        self.summary: dict = {}
        self._done("plugins")  # both are arguments: loaded before the engine exists (from_recipe)
        self._done("recipe")
        self._seed()
        self.dist, device_name = distributed.init(recipe.parallel.strategy, device or recipe.train.device)
        if not self.dist.is_main:
            self.console = Console(False)  # one console, one set of files: rank 0's
        self.device = resolve_device(device_name)
        self.precision_auto = recipe.train.precision == "auto"
        self.recipe = recipe = resolve_precision(recipe, self.device)
        self.threads = threads.configure(self.device.type)
        self.output_dir = Path(recipe.output_dir)
        self.model_name = recipe.model.name

        # Fine-tuning (train.init_from): the source is read now, because the tokenizer comes
        # from it; a run that resumes takes it from the checkpoint it resumes instead.
        self.init_source = None
        self.init_record: dict | None = None  # the source, as checkpoints and model cards name it
        self.curvature_offset = 0  # steps of the curvature schedule done before this run
        # A training run finds the checkpoint it resumes first (--resume): (state, path) or None.
        self._resume_from = None if checkpoint is not None else self._find_resume(resume)
        tok_state = checkpoint.get("tokenizer") if checkpoint else None
        if checkpoint is None and recipe.train.init_from:
            if self._resume_from is not None:
                tok_state = self._resume_from[0].get("tokenizer")
            else:
                self.init_source = finetune.load_source(recipe.train.init_from, plugins)
                finetune.check_recipe(recipe, self.init_source)
                tok_state = self.init_source.tokenizer_state
        self.tokenizer = build_tokenizer(recipe, plugins, state=tok_state)
        self._done("tokenizer")

        self.kernels = self._select_kernels()  # before the preflight: its meta model uses them
        self._done("kernels")
        if checkpoint is None:  # a training run: fail before data is read or memory allocated
            self._preflight(allow_cpu)

        self.train_sampler = self.val_sampler = None
        self.sources = []
        if with_data:
            self._build_data(dummy_data)
        self._done("data")

        vocab = model_vocab_size(recipe, self.tokenizer)
        self.model = build_model(recipe, "meta", plugins=plugins, vocab_size=vocab, kernels=self.kernels)
        self.vocab_size = vocab
        self.seq_len = self.model.seq_len
        self.frozen = finetune.freeze(self.model, recipe.train.freeze) if recipe.train.freeze else None
        if self.init_source is not None:  # names and shapes, before any memory is allocated
            finetune.check_weights(self.model, self.init_source.model_state(self.model),
                                   f"train.init_from = {self.init_source.path!r}")
        check_strategy = getattr(self.model, "check_strategy", None)
        if callable(check_strategy):
            check_strategy(recipe.parallel.strategy)
        memory.setup_model(self)  # train.param_dtype (cast on meta), train.ce_chunk_tokens
        self._done("model")

        train = recipe.train
        memory.setup_checkpointing(self)
        self._done("activation_checkpointing")
        self._loss_fn = self.model.loss
        strategy = recipe.parallel.strategy
        if train.compile:
            # Block by block (regional compilation), then wrap (torchtitan's order): every
            # block has the same code, so one compiled graph serves all layers (parameters are
            # graph inputs), which makes the first step minutes faster than tracing the whole
            # model and avoids whole-graph recompiles. Embedding, final norm and loss stay eager.
            # A plugin model without ``.blocks`` gets its whole loss compiled instead.
            mode = None if train.compile_mode == "default" else train.compile_mode
            if strategy == "none" and getattr(self.model, "blocks", None) is None:
                self._loss_fn = torch.compile(self.model.loss, mode=mode)
            else:
                for unit in distributed.shard_units(self.model):
                    unit.compile(mode=mode)
        # CUDA-graph modes: each forward must tell the graph trees a new micro-batch begins
        self._cudagraphs = (train.compile and train.compile_mode in ("reduce-overhead", "max-autotune")
                            and self.device.type == "cuda")
        self._done("compile")
        if strategy == "fsdp":
            # Shard on the meta device, allocate only this rank's shards, then copy in the
            # weights and buffers rank 0 initializes: the same init as a single-process run.
            # The sharded model is never initialized itself (init code may mix plain tensors
            # with the DTensor parameters; rank 0's values replace everything anyway).
            self._loss_fn = distributed.wrap(self.model, self.dist, train.precision, self.device)
            self._done("parallel")
            self.model.to_empty(device=self.device)
            self._broadcast_init_from_rank0()
            self._done("materialize")
        else:
            self._done("parallel")
            materialize(self.model, self.device)
            if strategy == "ddp":  # DDP needs real weights: it wraps right after they exist
                self._loss_fn = distributed.wrap(self.model, self.dist, train.precision, self.device)
            self._done("materialize")

        self.optimizer = self._build("optimizer", recipe.optimizer, params=param_groups(self.model))
        self.in_backward = memory.setup_optimizer(self)  # train.optimizer_in_backward: hooks, else None
        self._done("optimizer")
        self.lr_scheduler = self._build(
            "lr_scheduler", recipe.lr_scheduler, optimizer=self.optimizer, max_steps=train.max_steps
        )
        self.curvature_scheduler = None
        if recipe.curvature_scheduler is not None:
            self.curvature_scheduler = self._build(
                "curvature_scheduler", recipe.curvature_scheduler, max_steps=train.max_steps
            )
            self.model.set_curvature(self.curvature_scheduler.value(0))
        self.scaler = torch.amp.GradScaler(self.device.type) if train.precision == "fp16" else None
        self._done("schedulers")

        if checkpoint is not None:
            self._load_state(checkpoint, checkpoint.get("path", "<checkpoint>"), full=False)
        elif self._resume_from is not None:
            state, path = self._resume_from
            self._load_state(state, str(path), full=True)
            self.console.print(f"Resumed from {path} at step {self.step}")
            self.resumed_from = str(path)
        elif self.init_source is not None:
            self._start_from(self.init_source)
        self._resume_from = None  # the loaded state is not kept alive
        self._done("resume")

    @property
    def plugin_errors(self) -> list:
        """Plugins that failed and were disabled (:class:`phase7fw.plugins.PluginLoadError`:
        ``name``, ``dist`` = "distribution==version", ``error``, ``hook``)."""
        return self.plugins.load_errors

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_recipe(cls, recipe, overrides=None, *, dummy_data: bool = False, resume: str = "auto",
                    device: str | None = None, plugins: Plugins | None = None, quiet: bool = False,
                    allow_cpu: bool = False) -> "Engine":
        """Build a run from a recipe path (or dict, or :class:`Recipe`) and overrides
        (``{"train.max_steps": 20}`` or ``["train.max_steps=20"]``). ``allow_cpu``: build a
        GPU-sized recipe on a CPU anyway (:mod:`phase7fw.core.preflight`)."""
        plugins = plugins or load_plugins()
        if not isinstance(recipe, Recipe):
            recipe = load_recipe(recipe, overrides, plugins=plugins)
        elif overrides:
            recipe = load_recipe(recipe_to_dict(recipe), overrides, plugins=plugins)
        return cls(recipe, plugins=plugins, dummy_data=dummy_data, resume=resume, device=device,
                   console=Console(not quiet), allow_cpu=allow_cpu)

    @classmethod
    def from_checkpoint(cls, path, *, device: str | None = None, with_data: bool = False,
                        plugins: Plugins | None = None, quiet: bool = True) -> "Engine":
        """Rebuild a trained model (and its tokenizer) from a checkpoint, for eval or generation.
        ``with_data=True`` also loads the recipe's data (needed by ``evaluate``)."""
        state = load_checkpoint(path)
        plugins = plugins or load_plugins()
        recipe_text = state.get("recipe")
        if not isinstance(recipe_text, str):
            raise CheckpointError(f"{path} holds no recipe; it was not written by phase7fw")
        import tomllib

        if state.get("sharded"):
            raise CheckpointError(f"{path} is a sharded (FSDP) checkpoint; make one file of it first:"
                                  f" phase7fw checkpoint consolidate {path} OUT.pt")
        try:
            raw = tomllib.loads(recipe_text)
        except tomllib.TOMLDecodeError as exc:
            raise CheckpointError(f"the recipe stored in {path} is not valid TOML ({exc}); it was damaged or"
                                  " edited by hand") from None
        # One process: eval and generation never need the training run's DDP/FSDP wrapping.
        try:
            recipe = load_recipe(raw, {"parallel.strategy": "none"}, plugins=plugins, checkpoint=True)
        except RecipeError as exc:
            raise RecipeError(exc.errors, source=f"stored in {path}") from None
        engine = cls(recipe, plugins=plugins, resume="never", device=device, with_data=with_data,
                     checkpoint={**state, "path": str(path)}, console=Console(not quiet))
        engine.checkpoint_file = str(path)
        return engine

    def _broadcast_init_from_rank0(self) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        full = {}
        if self.dist.is_main:
            torch.manual_seed(self.recipe.run.seed)
            reference = build_model(self.recipe, "cpu", plugins=self.plugins, vocab_size=self.vocab_size,
                                    kernels=self.kernels)
            full = reference.state_dict()
        set_model_state_dict(self.model, full, options=StateDictOptions(full_state_dict=True,
                                                                        broadcast_from_rank0=True))
        # Buffers (RoPE tables, the curvature) are not sharded and not all in the state dict.
        ref_buffers = dict(reference.named_buffers()) if self.dist.is_main else {}
        with torch.no_grad():
            for name, buf in self.model.named_buffers():
                if self.dist.is_main:
                    buf.copy_(ref_buffers[name])
                distributed.broadcast_tensor(buf, self.dist)

    def _seed(self) -> None:
        torch.manual_seed(self.recipe.run.seed)
        self._done("seed")

    def _done(self, step: str) -> None:
        self.build_steps.append(step)

    def _build(self, kind: str, spec, **context):
        return self.registry.build(kind, spec.name, spec.config, **context)

    def _build_data(self, dummy_data: bool) -> None:
        recipe = self.recipe
        # Sources, tokenizer preparation and the tokenized cache: see phase7fw/data/mixture.py.
        self.sources = load_mix(recipe, self.registry, self.tokenizer, cache_dir=cache_dir(recipe),
                                dummy_data=dummy_data, log=self.console.print)
        seq_len = recipe.model.config.seq_len
        train = recipe.train
        # Each rank reads its slice of the global batch: N ranks x batch b = 1 process x batch N*b.
        ranks = {"rank": self.dist.rank, "world_size": self.dist.world_size}
        self.train_sampler = MixtureSampler(self.sources, seq_len=seq_len, batch_size=train.batch_size,
                                            seed=recipe.run.seed, split="train", sampling=recipe.data.sampling,
                                            **ranks)
        self.val_sampler = None
        if recipe.data.val_fraction > 0:  # random windows: the same validation set whatever the sampling
            self.val_sampler = MixtureSampler(self.sources, seq_len=seq_len, batch_size=train.batch_size,
                                              seed=recipe.run.seed, split="val", **ranks)

    def _select_kernels(self) -> dict[str, str]:
        """Resolve ``[kernels]`` to an implementation per op: "reference" (the op's torch
        reference) or a registered kernel ``"<op>:<impl>"``; "auto" picks Triton on CUDA when it
        is registered and usable. A chosen kernel carries the recipe's tuning options for it
        (:class:`phase7fw.kernels.KernelImpl`, handed to the factories)."""
        from phase7fw.kernels import KernelImpl, triton_usable

        chosen, reasons = {}, {}
        for op, choice in self.recipe.kernels.items():
            want = choice.impl
            if want == "reference":
                chosen[op] = "reference"
                continue
            if want == "auto":
                if ("kernel", f"{op}:triton") not in self.registry:
                    chosen[op] = "reference"
                    reasons[op] = "auto: no Triton kernel registered"
                    continue
                ok, why = triton_usable(self.device.type)
                chosen[op] = "triton" if ok and self.device.type == "cuda" else "reference"
                reasons[op] = f"auto: {why}"
            else:
                if ("kernel", f"{op}:{want}") not in self.registry:
                    raise Phase7Error(f"kernels.{op} = \"{want}\" but no such kernel is registered for {op};"
                                      " use \"reference\" or \"auto\"")
                if want == "triton":
                    ok, why = triton_usable(self.device.type)
                    if not ok:  # never fall back silently
                        raise Phase7Error(f"kernels.{op} = \"triton\" but Triton cannot run here: {why};"
                                          " use \"reference\" or \"auto\"")
                    reasons[op] = why
                chosen[op] = want
            chosen[op] = KernelImpl(chosen[op], choice.config if chosen[op] != "reference" else None)
        self.kernel_reasons = reasons  # printed once, in the run header (describe)
        return chosen

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """Everything a checkpoint holds. Model and optimizer state are keyed by parameter
        name (torch.distributed.checkpoint's layout), whatever the strategy, so single-file,
        DDP and consolidated FSDP checkpoints load into one another."""
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        return {"model": model_state, "optimizer": optim_state, **self._extra_state()}

    def _extra_state(self) -> dict:
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {
            "phase7fw_version": __version__,
            "step": self.step,
            "max_steps": self.recipe.train.max_steps,  # what the LR schedule is planned for
            "model_name": self.model_name,
            "world_size": self.dist.world_size,
            "strategy": self.dist.strategy,
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "curvature_scheduler": self.curvature_scheduler.state_dict() if self.curvature_scheduler else None,
            "grad_scaler": self.scaler.state_dict() if self.scaler else None,
            "rng": rng,
            "data": self.train_sampler.state_dict() if self.train_sampler else None,
            "trackers": self.tracker_state,
            "recipe": recipe_to_toml(self.recipe),
            "init_from": self.init_record,
            "curvature_offset": self.curvature_offset,
            "tokenizer": self.tokenizer.state(),
            "tokenizer_fingerprint": self.tokenizer.fingerprint(),
            "metrics": {"best_val_loss": self.best_val_loss, "best_val_bpb": self.best_val_bpb,
                        "last_val": self.last_val, "skipped_steps": self.skipped_steps,
                        "tokens_seen": self.tokens_seen},
        }

    @torch.no_grad()
    def weights_finite(self) -> bool:
        """True when no parameter holds NaN or Inf (on every rank: all ranks get the answer)."""
        local = [p.to_local() if hasattr(p, "to_local") else p for p in self.model.parameters()]
        flags = [torch.isfinite(t).all() for t in local if t.numel()]
        ok = torch.stack(flags).all().float() if flags else torch.ones((), device=self.device)
        return float(distributed.all_mean(ok.to(self.device), self.dist)) == 1.0

    def save(self, path) -> Path:
        """Write a complete checkpoint to ``path``, atomically: one file, or with FSDP a
        directory of that name holding the shards (torch.distributed.checkpoint)."""
        path = Path(path)
        if self.dist.strategy == "fsdp":
            from torch.distributed.checkpoint.state_dict import get_state_dict

            model_state, optim_state = get_state_dict(self.model, self.optimizer)
            save_sharded_checkpoint(path, {"model": model_state, "optimizer": optim_state}, self._extra_state(),
                                    self.dist)
            return path
        state = self.state_dict()
        if self.dist.is_main:
            save_checkpoint(path, state)
        distributed.barrier(self.dist)
        return path

    def _find_resume(self, resume: str):
        """The checkpoint ``resume`` asks for, loaded: (state, path), or None for a fresh run.
        ``auto``: the newest in ``run.output_dir`` if there is one; ``latest``: the newest, an
        error if there is none; ``never``: an error if there is one; else a path. Saves a killed
        run left half done are cleaned up first (phase7fw.core.checkpoint.remove_interrupted_saves)."""
        if self.dist.is_main:
            for line in remove_interrupted_saves(self.output_dir):
                self.console.print(line)
        distributed.barrier(self.dist)
        if resume in ("never", "auto", "latest"):
            path = latest_checkpoint(self.output_dir)
            if resume == "never" and path is not None:
                raise Phase7Error(
                    f"{self.output_dir} already holds checkpoints of a run ({path.name}); continue it"
                    " with --resume auto, or start a new one in another folder (--set run.output_dir=...)"
                )
            if resume == "latest" and path is None:
                raise CheckpointError(
                    f"--resume latest: {self.output_dir} holds no checkpoint to resume (no *_step_N.pt or"
                    " *_final.pt); give a checkpoint file (--resume PATH), or start a new run with"
                    " --resume auto (the default)"
                )
            if path is None or resume == "never":
                return None
        else:
            path = Path(resume)
        return load_checkpoint(path, map_location="cpu"), path

    def _preflight(self, allow_cpu: bool) -> None:
        """Checks on the model built on the meta device, before data or weights exist: the
        checkpoint to resume holds this model, and the run fits this machine (phase7fw/core/preflight.py)."""
        with torch.random.fork_rng(devices=[]):  # building never moves the seeded RNG
            vocab = model_vocab_size(self.recipe, self.tokenizer)
            model, optimizer = preflight.meta_model(self.recipe, self.plugins, vocab, self.kernels)
        if self._resume_from is not None:
            state, path = self._resume_from
            self.model_differences = preflight.check_checkpoint_fits(state, str(path), self.recipe, model,
                                                                     self.plugins)
        self.machine = preflight.check_machine(self.recipe, model, optimizer, vocab, self.device,
                                               world_size=self.dist.world_size,
                                               strategy=self.recipe.parallel.strategy, allow_cpu=allow_cpu)

    def _start_from(self, source) -> None:
        """``train.init_from``: the source's weights, everything else new (step 0)."""
        finetune.load_weights_into(self, source)
        self.init_record = source.record()
        self._continue_curvature(source.curvature_offset + source.step)
        self.console.print(f"Fine-tuning from {source.path} (its step {source.step}): weights loaded, step 0,"
                           " fresh optimizer, LR schedule and data position")

    def _continue_curvature(self, offset: int) -> None:
        """Run the curvature schedule ``offset`` steps in (the steps of the runs before this one)."""
        self.curvature_offset = int(offset)
        if self.curvature_scheduler is None:
            return
        if self.curvature_offset:
            inner = getattr(self.curvature_scheduler, "inner", self.curvature_scheduler)
            self.curvature_scheduler = finetune.ShiftedCurvature(inner, self.curvature_offset)
        self.model.set_curvature(self.curvature_scheduler.value(self.step))

    def _load_model_and_optimizer(self, state: dict, where: str, full: bool) -> None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_state_dict,
            set_model_state_dict,
            set_state_dict,
        )

        try:
            if state.get("sharded"):
                if self.dist.strategy != "fsdp":
                    raise CheckpointError(
                        f"{where} is a sharded (FSDP) checkpoint; run with parallel.strategy = \"fsdp\" on"
                        f" {state.get('world_size')} processes, or make a single file of it first:"
                        f" phase7fw checkpoint consolidate {where} OUT.pt"
                    )
                if int(state.get("world_size", 0)) != self.dist.world_size:
                    raise CheckpointError(f"{where} was sharded over {state.get('world_size')} processes, this run"
                                          f" has {self.dist.world_size}; use the same number of processes")
                from phase7fw.core.dcp_safe import load_sharded

                model_state, optim_state = get_state_dict(self.model, self.optimizer)
                target = {"model": model_state, "optimizer": optim_state} if full else {"model": model_state}
                load_sharded(target, state["path"])
                state = {**state, **target}
            if not state.get("sharded"):  # older single-file checkpoints: equivalent shapes
                shapes = {name: tuple(p.shape) for name, p in self.model.named_parameters()}
                model_sd, optim_sd = upgrade_shapes(state["model"], state.get("optimizer") if full else None, shapes)
                state = {**state, "model": model_sd, "optimizer": optim_sd}
            if full:
                set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                               optim_state_dict=self._adapt_optimizer_state(state["optimizer"]))
            else:
                opts = StateDictOptions(full_state_dict=not state.get("sharded"))
                set_model_state_dict(self.model, state["model"], options=opts)
        except CheckpointError:
            raise
        except (RuntimeError, KeyError, ValueError) as exc:
            # torch's text ends with advice for its own API (StateDictOptions(strict=False)),
            # which a user of the CLI cannot follow: keep what is wrong, not the advice
            detail = " ".join(line.strip() for line in str(exc).splitlines()
                              if line.strip() and "StateDictOptions" not in line and "strict=False" not in line)
            raise CheckpointError(f"{where} does not fit the model of this recipe: {detail[:500]}; resume it with"
                                  " the recipe it was trained with, or start a new run in another folder"
                                  " (--resume never --set run.output_dir=DIR)") from None

    def _adapt_optimizer_state(self, optim_state: dict) -> dict:
        """A checkpoint's optimizer state in a layout this run's optimizer reads: the plugin of
        the optimizer that wrote it converts it (the ``adapt_optimizer_state`` hook), if needed."""
        adapted = self.plugins.call("adapt_optimizer_state", state=optim_state, optimizer=self.optimizer)
        return optim_state if adapted is None else adapted

    def _load_state(self, state: dict, where: str, *, full: bool) -> None:
        """Load a checkpoint into the built run; ``full`` also restores training state."""
        if state.get("model_name") != self.model_name:
            raise CheckpointError(f"{where} holds a {state.get('model_name')!r} model, the recipe builds"
                                  f" {self.model_name!r}")
        fp = state.get("tokenizer_fingerprint")
        if fp is not None and fp != self.tokenizer.fingerprint():
            raise CheckpointError(f"{where} was trained with tokenizer {fp!r}, the recipe gives"
                                  f" {self.tokenizer.fingerprint()!r}; token ids would not match")
        saved_world = int(state.get("world_size", 1))
        if full and saved_world != self.dist.world_size:
            raise CheckpointError(
                f"{where} was written by {saved_world} process(es), this run has {self.dist.world_size}: the data"
                " order and the optimizer shards would not continue exactly; resume with the same number of"
                " processes (phase7fw eval/generate/chat load it anywhere)."
            )
        self._load_model_and_optimizer(state, where, full)
        self.step = int(state.get("step", 0))
        metrics = state.get("metrics") or {}
        self.best_val_loss = float(metrics.get("best_val_loss", math.inf))
        self.best_val_bpb = metrics.get("best_val_bpb")
        self.last_val = dict(metrics.get("last_val") or {})
        self.tokens_seen = int(metrics.get("tokens_seen", 0))
        self.init_record = state.get("init_from")
        # The model's curvature is that of the checkpoint's step, also for eval and generation.
        self._continue_curvature(int(state.get("curvature_offset", 0)))
        if not full:
            return
        try:
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
            if self.curvature_scheduler is not None and state.get("curvature_scheduler") is not None:
                self.curvature_scheduler.load_state_dict(state["curvature_scheduler"])
            if self.scaler is not None and state.get("grad_scaler"):
                self.scaler.load_state_dict(state["grad_scaler"])
            if callable(getattr(self.lr_scheduler, "get_lr", None)):
                self.lr_scheduler.get_lr()  # a scheduler state with wrong values fails here, not mid-run
        except (KeyError, ValueError, RuntimeError, TypeError) as exc:
            raise CheckpointError(f"{where}: scheduler state does not fit this recipe: {exc}") from None
        self._replan_if_extended(state, where)
        if self.train_sampler is not None and state.get("data"):
            self.train_sampler.load_state_dict(state["data"])
        rng = state.get("rng") or {}
        per_rank = state.get("rng_per_rank")
        if per_rank and len(per_rank) == self.dist.world_size:
            rng = per_rank[self.dist.rank] or {}
        if "torch" in rng:
            torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(rng["cuda"])
        self.skipped_steps = int(metrics.get("skipped_steps", 0))
        self.tracker_state = dict(state.get("trackers") or {})
        if self.curvature_scheduler is not None:  # its own state is loaded now
            self.model.set_curvature(self.curvature_scheduler.value(self.step))

    def _replan_if_extended(self, state: dict, where: str) -> None:
        """A run resumed with another ``train.max_steps``: the LR schedule follows the new
        length (said in one line), or the resume is refused; never the old plan silently."""
        planned, wanted = planned_steps(state), self.recipe.train.max_steps
        if planned is None or planned == wanted:
            return
        replan = getattr(self.lr_scheduler, "replan", None)
        if not callable(replan):
            raise CheckpointError(
                f"{where} was planned for train.max_steps = {planned}, the recipe says {wanted}, and lr_scheduler"
                f" {self.recipe.lr_scheduler.name!r} cannot re-plan its schedule; keep train.max_steps = {planned}"
                " or start a new run (--resume never, another run.output_dir)")
        before = self.optimizer.param_groups[0]["lr"]
        replan(wanted)
        after = self.optimizer.param_groups[0]["lr"]
        self.console.print(f"train.max_steps changed from {planned} to {wanted}: the LR schedule is re-planned for"
                           f" {wanted} steps (lr at step {self.step}: {before:.3g} -> {after:.3g})")

    # ------------------------------------------------------------------ running
    def fit(self) -> dict:
        """Train to ``train.max_steps``; returns a summary dict (steps, final loss, best val
        loss, tokens, ...). Ctrl-C saves a checkpoint and raises :class:`KeyboardInterrupt`."""
        from phase7fw.core.trainer import Trainer

        return Trainer(self).run()

    def log(self, row: dict) -> None:
        """Send a row (``{"step": ..., "split": ..., metric: value}``) to the trackers of the
        running ``fit()`` (e.g. from a callback)."""
        trainer = getattr(self, "_trainer", None)
        if trainer is None:
            raise Phase7Error("engine.log(row) works during fit() only: the trackers exist while a run trains")
        trainer._log(row)

    @torch.no_grad()
    def evaluate(self, batches: int | None = None) -> dict:
        """Mean validation loss, perplexity and bits per byte (``bpb``: None when the data has
        no text, e.g. synthetic tokens) over ``train.eval_batches`` fixed batches."""
        if self.val_sampler is None:
            if self.train_sampler is None:
                raise Phase7Error("evaluate needs data: build the engine with data (from_checkpoint(..., with_data=True))")
            raise Phase7Error("data.val_fraction is 0: there is no validation split to evaluate on")
        if batches is not None and (not isinstance(batches, int) or batches < 1):
            raise Phase7Error(f"evaluate: batches must be an integer >= 1 (or None: train.eval_batches), got {batches!r}")
        n = batches or self.recipe.train.eval_batches
        was_training = self.model.training
        self.model.eval()
        total = torch.zeros((), device=self.device)
        n_bytes = [self.val_sampler.batch_bytes(i) for i in range(n)]  # this rank's rows
        try:
            for i in range(n):
                x, y = (t.to(self.device) for t in self.val_sampler.batch(i))
                with self.autocast():
                    # Through the (possibly wrapped) loss, so FSDP gathers its shards; the
                    # validation number is the cross-entropy without auxiliary losses.
                    loss, metrics = self._forward_loss(x, y)
                total += metrics.get("ce_loss", loss).detach().float()
        finally:
            self.model.train(was_training)
        loss = float(distributed.all_mean(total, self.dist)) / n
        tokens = n * self.val_sampler.batch_size * self.seq_len  # per rank; every rank has as many
        bpb = None
        if all(b is not None for b in n_bytes):
            mean_bytes = float(distributed.all_mean(torch.tensor(float(sum(n_bytes)), device=self.device), self.dist))
            bpb = bits_per_byte(loss, tokens, mean_bytes)
        return {"loss": loss, "ppl": math.exp(min(loss, 700.0)), "bpb": bpb, "tokens": tokens}

    def _forward_loss(self, x: torch.Tensor, y: torch.Tensor):
        """Every training and validation forward: ``_loss_fn(x, y)``. With a CUDA-graph compile
        mode (``train.compile_mode``) it first tells the graph trees that a new micro-batch
        begins, so the previous one's graph outputs (already consumed by its backward) may be
        overwritten."""
        if self._cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        return self._loss_fn(x, y)

    def autocast(self):
        precision = self.recipe.train.precision
        if precision == "fp32":
            return torch.autocast(self.device.type, enabled=False)
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    @torch.no_grad()
    def generate(self, prompt: str, max_new_tokens: int = 64, temperature: float = 0.8, top_k: int | None = None,
                 top_p: float | None = None, repetition_penalty: float = 1.0, seed: int | None = None,
                 use_cache: bool = True, *, stop=None, on_text=None, cuda_graph: str = "auto",
                 compile_step: bool = False) -> str:
        """Continue ``prompt``; returns only the new text. Temperature 0 is greedy.

        ``use_cache`` decodes incrementally (the model's cache, O(1) per token for phase7);
        ``False`` recomputes the visible context per token; both give the same tokens.
        ``stop``: a string or strings that end generation (not included in the result);
        ``on_text(str)``: called with the text as it is generated (streaming).
        ``cuda_graph``: auto / on / off and ``compile_step``, see :meth:`decoder`.
        """
        from phase7fw.inference.generation import SamplingParams, generate_text

        params = SamplingParams(max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed).checked()
        decoder = self.decoder(use_cache=use_cache, cuda_graph=cuda_graph, compile_step=compile_step)
        decoder.reset([self.tokenizer.eos_id] + self.tokenizer.encode(prompt))  # EOS: "a document starts"
        was_training = self.model.training
        self.model.eval()
        try:
            return generate_text(decoder, self.tokenizer, params, stop=stop, on_text=on_text)
        finally:
            self.model.train(was_training)

    def decoder(self, use_cache: bool = True, cuda_graph: str = "auto", compile_step: bool = False):
        """A :class:`phase7fw.inference.decoding.Decoder` over this engine's model (autocast as in training).
        ``cuda_graph``: ``auto`` captures the static decode step in a CUDA graph on a CUDA
        device (:class:`phase7fw.inference.decoding.GraphedDecoder`), ``on`` requires it, ``off`` keeps
        the dynamic cached path (:func:`phase7fw.inference.decoding.make_decoder`). ``compile_step``:
        compile the captured step first (CUDA only; 2.5x faster tokens for the 1.5B phase7 on an
        H100, a compilation at the first prompt), see :class:`phase7fw.inference.decoding.GraphedDecoder`."""
        from phase7fw.inference.decoding import make_decoder

        return make_decoder(self.model, use_cache=use_cache, cuda_graph=cuda_graph, device=self.device,
                            autocast=self.autocast, compile_step=compile_step)

    def describe(self) -> list[str]:
        """The run header: what was built, its size, where output goes."""
        r = self.recipe
        breakdown = self.model.parameter_breakdown()
        total = breakdown.get("total", sum(p.numel() for p in self.model.parameters()))
        parts = ", ".join(f"{k} {human(v)}" for k, v in breakdown.items() if k != "total")
        lines = [
            f"phase7fw {__version__} | run {r.run.name!r} -> {self.output_dir}",
            f"device {self.device} | precision {r.train.precision}" + (" (auto)" if self.precision_auto else "")
            + (f" | {self.threads} CPU thread{'s' if self.threads > 1 else ''}" if self.device.type == "cpu" else "")
            + f" | torch {torch.__version__}",
            f"model {self.model_name}: {human(total)} parameters ({total:,})" + (f" = {parts}" if parts else ""),
        ]
        extra = getattr(self.model, "describe_extra", None)
        if callable(extra):
            lines += extra()
        lines.append(f"tokenizer {r.data.tokenizer.name} (vocab {self.tokenizer.vocab_size}) | model vocab {self.vocab_size}")
        for s in self.sources:
            lines.append(f"data {s.label}: weight {s.weight:g}, {human(len(s.train))} train / {human(len(s.val))} val tokens")
        t = r.train
        lines.append(
            f"batch {t.batch_size} x accum {t.grad_accum_steps} x seq {self.seq_len}"
            f" = {t.batch_size * t.grad_accum_steps * self.seq_len:,} tokens/step | steps {t.max_steps}"
            f" | optimizer {r.optimizer.name} | lr schedule {r.lr_scheduler.name}"
        )
        why = sorted(set(getattr(self, "kernel_reasons", {}).values()))
        lines.append("kernels: " + ", ".join(f"{op}={impl}" for op, impl in self.kernels.items())
                     + (f" ({'; '.join(why)})" if why else ""))
        if self.init_record:
            lines.append(f"fine-tuning from {self.init_record['path']} (its step {self.init_record['step']},"
                         f" {human(self.init_record['tokens_seen'])} tokens)")
        if self.frozen:
            frozen, total = self.frozen
            lines.append(f"frozen: {human(frozen)} of {human(total)} parameters ({', '.join(r.train.freeze)})")
        if self.model_differences:
            lines.append("note: the model settings differ from the resumed checkpoint's (the weights still fit): "
                         + "; ".join(self.model_differences))
        lines += memory.plan_lines(self)
        return lines
