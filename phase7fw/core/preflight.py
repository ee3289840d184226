"""Checks a training run makes before it reads data or allocates a parameter.

A recipe that cannot work on this machine should say so in a second, not after minutes of
tokenizing and allocating, or never (a 1.5B model on a laptop CPU builds for minutes, then a
step takes most of an hour):

- :func:`check_checkpoint_fits`: the checkpoint to resume holds the recipe's model (same
  parameter names and shapes; what differs is named by recipe key, from the recipe stored
  in the checkpoint);
- :func:`check_machine`: the memory plan (phase7fw/core/memory.py) fits the device (GPU memory,
  or host memory for a CPU run and for offloaded optimizer state), and on a CPU one step is
  not hopelessly slow: its FLOPs at this CPU's measured matmul speed (a lower bound on the
  step time) stay under :data:`CPU_STEP_LIMIT_S`, unless the user insists (``--allow-cpu``).

Both work on the model built on the meta device (no memory), so nothing big exists yet.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import torch

from phase7fw.core.checkpoint import upgrade_shapes
from phase7fw.core.console import human
from phase7fw.errors import CheckpointError, Phase7Error

GIB = 2**30
#: a CPU step that needs at least this long (at the measured matmul speed) is a GPU recipe
CPU_STEP_LIMIT_S = 60.0
_GEMM_CACHE: dict[int, float] = {}


class ResourceError(Phase7Error):
    """The run does not fit this machine: ``kind`` "memory" (the memory plan is larger than
    the device or the host) or "speed" (a GPU-sized recipe on a CPU)."""

    def __init__(self, message: str, kind: str):
        super().__init__(message)
        self.kind = kind


# ----------------------------------------------------------------------------- the machine
def host_memory_available() -> int | None:
    """Bytes of memory this process can still use: the kernel's MemAvailable, lowered by a
    cgroup (container) limit when one is set. None when unknown (not Linux)."""
    avail = None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except OSError:
        return None
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit = Path(limit_file).read_text().strip()
            used = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 2**60 and avail is not None:
            avail = min(avail, max(0, int(limit) - used))
        break
    return avail


def cpu_matmul_flops() -> float:
    """FLOP/s of an fp32 512^3 matmul on this CPU with the current thread count (the best of
    a few; ~20 ms). A private generator: the global RNG (model init) is untouched."""
    threads = torch.get_num_threads()
    if threads not in _GEMM_CACHE:
        g = torch.Generator().manual_seed(0)
        a, b = torch.randn(512, 512, generator=g), torch.randn(512, 512, generator=g)
        best = math.inf
        for _ in range(5):
            t0 = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t0)
        _GEMM_CACHE[threads] = 2 * 512**3 / max(best, 1e-9)
    return _GEMM_CACHE[threads]


# ----------------------------------------------------------------------------- estimates
def meta_model(recipe, plugins, vocab_size: int, kernels: dict):
    """The recipe's model on the meta device with the memory switches applied (as the engine
    builds it), and its optimizer on those meta parameters (None if it cannot be built there)."""
    from types import SimpleNamespace

    from phase7fw.core import memory
    from phase7fw.core.build import build_model
    from phase7fw.core.optim_groups import param_groups

    model = build_model(recipe, "meta", plugins=plugins, vocab_size=vocab_size, kernels=kernels)
    memory.setup_model(SimpleNamespace(recipe=recipe, model=model))
    try:
        spec = recipe.optimizer
        optimizer = plugins.registry.build("optimizer", spec.name, spec.config, params=param_groups(model))
    except Exception:  # noqa: BLE001 - only the estimate is lost; the real build reports errors
        optimizer = None
    return model, optimizer


def step_flops(model, recipe, world_size: int = 1) -> float:
    """Training FLOPs of one optimizer step on one process (phase7fw bench's count:
    6 N_matmul + attention + SSM per token), with recomputation counted."""
    t = recipe.train
    per_token = model.flops_per_token(model.seq_len)["total"]  # the model contract (interfaces.py)
    tokens = t.batch_size * t.grad_accum_steps * model.seq_len
    factor = 1.0
    if t.activation_checkpointing and t.checkpoint_policy == "full":  # the forward runs again in backward
        factor += 1 / 3 / t.checkpoint_every  # (save_matmuls reruns only elementwise work: not counted)
    if t.optimizer_in_backward and t.grad_clip > 0:
        factor *= 2  # exact clipping: forward + backward twice (phase7fw/core/memory.py)
    return per_token * tokens * factor


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} minutes"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} hours"
    return f"{seconds / 86400:.0f} days"


# ----------------------------------------------------------------------------- checks
def check_machine(recipe, model, optimizer, vocab_size: int, device: torch.device, *, world_size: int = 1,
                  strategy: str = "none", allow_cpu: bool = False) -> dict:
    """Stop (:class:`ResourceError`, exit 2) a run that cannot fit or cannot progress here.
    Returns what was estimated (for tests and the run header)."""
    from phase7fw.core.memory import memory_plan

    plan = memory_plan(model, optimizer, recipe, vocab_size)
    state = plan["state_bytes"] / (world_size if strategy == "fsdp" else 1)
    device_need = state + plan["activations"] + plan["transient"]
    host_need = plan["optimizer_host"] * plan["params"]
    name, t = recipe.run.name, recipe.train
    shape = f"batch {t.batch_size} x accum {t.grad_accum_steps} x seq {model.seq_len}"
    fix = ("lower train.batch_size or model.seq_len (raise train.grad_accum_steps for the same tokens per"
           " step), or use the memory switches of docs/performance.md")
    host = host_memory_available()
    out = {"device_bytes": device_need, "host_bytes": host_need, "host_available": host}
    if device.type == "cpu":
        # First, as it does not depend on the machine's memory: is a step hopelessly slow here?
        flops = step_flops(model, recipe, world_size)
        rate = cpu_matmul_flops()
        seconds = flops / rate
        out.update(step_flops=flops, cpu_flops=rate, min_step_s=seconds)
        if seconds > CPU_STEP_LIMIT_S and not allow_cpu:
            cuda = "" if torch.cuda.is_available() else " and this machine has no CUDA GPU"
            raise ResourceError(
                f"run {name!r} is GPU-sized ({human(plan['params'])} parameters, {shape}, about"
                f" {(device_need + host_need) / GIB:,.1f} GiB of memory){cuda}: one step needs at least"
                f" {_duration(seconds)} on this CPU ({rate / 1e9:.0f} GFLOP/s measured), {t.max_steps:,} steps at"
                f" least {_duration(seconds * t.max_steps)}. Train a CPU recipe instead (phase7fw run"
                " recipes/phase7_quickstart.toml, or recipes/phase7_small.toml), or add --allow-cpu (with make:"
                " ARGS=--allow-cpu) to run this one here anyway", "speed")
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        total = torch.cuda.get_device_properties(index).total_memory
        out["device_total"] = total
        if device_need > total:
            raise ResourceError(
                f"run {name!r} needs about {device_need / GIB:,.1f} GiB of GPU memory ({human(plan['params'])}"
                f" parameters, {shape}; the memory plan's estimate) but {device} has {total / GIB:.1f} GiB; {fix}",
                "memory")
    else:
        host_need += device_need
    # processes of one job on this host (torchrun) share its memory
    host_need *= max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    out["host_bytes"] = host_need
    if host is not None and host_need > host:
        raise ResourceError(
            f"run {name!r} needs about {host_need / GIB:,.1f} GiB of host memory ({human(plan['params'])}"
            f" parameters, {shape}; the memory plan's estimate) but this machine has {host / GIB:.1f} GiB"
            f" available; {fix}", "memory")
    return out


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict):
            out.update(_flat(v, key))
        else:
            out[key] = v
    return out


def model_differences(state: dict, recipe, plugins) -> list[str]:
    """``model.d_model: 128 in the checkpoint, 2048 in the recipe`` for every model key the
    checkpoint's stored recipe sets differently (defaults filled in on both sides)."""
    import tomllib

    from phase7fw.recipe import load_recipe, recipe_to_dict

    try:
        saved = load_recipe(tomllib.loads(state["recipe"]), {"parallel.strategy": "none"}, plugins=plugins,
                            checkpoint=True)
    except Exception:  # noqa: BLE001 - an old or foreign recipe: compare what can be compared
        try:
            saved_model = tomllib.loads(state["recipe"]).get("model", {})
        except Exception:  # noqa: BLE001
            return []
    else:
        saved_model = recipe_to_dict(saved)["model"]
    mine = _flat(recipe_to_dict(recipe)["model"], "model")
    theirs = _flat(saved_model, "model")
    return [f"{k}: {theirs.get(k, '(unset)')!r} in the checkpoint, {mine.get(k, '(unset)')!r} in the recipe"
            for k in sorted(set(mine) | set(theirs)) if mine.get(k) != theirs.get(k)]


def _saved_tokenizer(state: dict) -> str | None:
    """The tokenizer name in the checkpoint's stored recipe (None when it cannot be read)."""
    import tomllib

    try:
        table = tomllib.loads(state["recipe"]).get("data", {}).get("tokenizer", {"name": "bytes"})
    except Exception:  # noqa: BLE001 - no stored recipe: the fingerprint check after the build decides
        return None
    name = table.get("name") if isinstance(table, dict) else None
    return name if isinstance(name, str) else None


def check_checkpoint_fits(state: dict, where: str, recipe, model, plugins) -> list[str]:
    """Raise :class:`CheckpointError` when the checkpoint to resume does not hold the recipe's
    model (its name, then the parameter names and shapes of the meta model) or was trained with
    another kind of tokenizer (the exact tokenizer is compared by fingerprint once it is built).
    Returns the model keys that differ but still fit (e.g. an attention window), for a note in
    the run header."""
    saved_name = state.get("model_name")
    if saved_name != recipe.model.name:
        raise CheckpointError(
            f"{where} holds a {saved_name!r} model, this recipe builds {recipe.model.name!r}: resume it with the"
            f" recipe it was trained with, or start a new run in another folder (--resume never --set"
            f" run.output_dir=DIR)")
    saved_tok = _saved_tokenizer(state)
    if saved_tok is not None and saved_tok != recipe.data.tokenizer.name:
        raise CheckpointError(
            f"{where} was trained with tokenizer {state.get('tokenizer_fingerprint', saved_tok)!r} (data.tokenizer"
            f" name {saved_tok!r}), the recipe gives {recipe.data.tokenizer.name!r}: token ids would not match;"
            " resume it with the recipe it was trained with, or start a new run in another folder (--resume never"
            " --set run.output_dir=DIR)")
    diffs = model_differences(state, recipe, plugins) if isinstance(state.get("recipe"), str) else []
    saved = state.get("model")
    if not isinstance(saved, dict):  # a sharded checkpoint: its tensors are read later
        return diffs
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    saved, _ = upgrade_shapes(saved, None, expected)  # older equivalent shapes still load
    got = {k: tuple(v.shape) for k, v in saved.items() if isinstance(v, torch.Tensor)}
    wrong = [k for k in expected if k in got and expected[k] != got[k]]
    missing = [k for k in expected if k not in got]
    extra = [k for k in got if k not in expected]
    if not (wrong or missing or extra):
        return diffs
    if diffs:
        what = "; ".join(diffs[:6]) + (f"; and {len(diffs) - 6} more" if len(diffs) > 6 else "")
    else:
        parts = [f"{k} is {got[k]} in the checkpoint, {expected[k]} in the model" for k in wrong[:3]]
        parts += [f"{len(missing)} parameter(s) missing (e.g. {missing[0]})"] if missing else []
        parts += [f"{len(extra)} unknown parameter(s) (e.g. {extra[0]})"] if extra else []
        what = "; ".join(parts)
    own = Path(where).parent / "resolved_recipe.toml"
    hint = (f"resume it with the recipe it was trained with (phase7fw run {own} --resume {where})"
            if own.is_file() else "resume it with the recipe it was trained with")
    raise CheckpointError(
        f"{where} does not fit this recipe's model: {what}. Nothing was built; {hint}, or start a new run"
        f" in another folder (--resume never --set run.output_dir=DIR)")
