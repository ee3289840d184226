"""Built-in trackers: ``jsonl`` (always available), ``wandb`` and ``tensorboard`` (optional).

Every tracker receives the rows the training loop logs: dicts with ``step`` (int) and
``split`` ("train" or "val") plus metrics. ``wandb`` and ``tensorboard`` keep only numeric
metrics; ``jsonl`` keeps every value, converted to plain JSON.

Factories are called as ``factory(config, *, run_dir, run_name, recipe, resume_state,
resume_step=None)``: ``resume_state`` is what ``state()`` returned when the checkpoint we
resume from was written, ``resume_step`` that checkpoint's step (``None`` on a fresh run).
"""

# No `from __future__ import annotations`: the recipe converter reads the config fields'
# types at runtime, so they must be real types, not strings.
import json
import math
import netrc
import os
import secrets
import socket
import string
import sys
import tempfile
from typing import Literal
from urllib.parse import urlparse

import attrs

from phase7fw.errors import Phase7Error
from phase7fw.fileio import writing
from phase7fw.hookspecs import hookimpl
from phase7fw.interfaces import Tracker
from phase7fw.recipe.options import option, positive

_RESERVED = ("step", "split")


# --------------------------------------------------------------------------- value helpers


def _plain(value):
    """Tensors and numpy values as Python numbers/lists; anything else unchanged."""
    if hasattr(value, "detach"):  # torch.Tensor, without importing torch here
        value = value.detach().cpu()
        return value.item() if value.numel() == 1 else value.tolist()
    if hasattr(value, "item") and getattr(value, "shape", None) == ():  # numpy scalar / 0-d array
        return value.item()
    if hasattr(value, "tolist"):  # numpy array
        return value.tolist()
    return value


def _jsonable(value):
    """A JSON-safe copy of ``value``: non-finite floats become ``null``, unknown objects
    their ``str`` (a log line must never fail to write)."""
    value = _plain(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return str(value)


def _number(value):
    """``value`` as an int/float, or ``None`` when it is not a single number."""
    value = _plain(value)
    if isinstance(value, (bool, int, float)):
        return value
    return None


def _numeric_metrics(row: dict) -> tuple[int, str, dict]:
    """(step, split, {metric: number}) of a row, non-numeric values dropped."""
    step = int(_plain(row["step"]))
    split = str(row.get("split", "train"))
    metrics = {}
    for key, value in row.items():
        if key in _RESERVED:
            continue
        number = _number(value)
        if number is not None:
            metrics[str(key)] = number
    return step, split, metrics


# --------------------------------------------------------------------------- jsonl


@attrs.frozen
class JsonlConfig:
    filename: str = option("training_log.jsonl", help="file name inside the run directory")


class JsonlTracker(Tracker):
    """One JSON object per row, appended and flushed at once so a crash loses nothing."""

    def __init__(self, path: str, resume_step: int | None = None):
        self.path = path
        with writing(path):
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            if resume_step is not None and os.path.exists(path):
                truncate_log(path, resume_step)
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def log(self, row: dict) -> None:
        """Append one row with one write; a write that fails (full disk) is rolled back, so the
        file never holds half a row."""
        line = (json.dumps(_jsonable(row), allow_nan=False, ensure_ascii=False) + "\n").encode("utf-8")
        end = os.lseek(self._fd, 0, os.SEEK_END)
        with writing(self.path):
            try:
                written = os.write(self._fd, line)
                while written < len(line):  # a short write: the rest, or the error that stopped it
                    written += os.write(self._fd, line[written:])
            except OSError:
                os.ftruncate(self._fd, end)
                raise

    def finish(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def truncate_log(path: str, last_step: int) -> None:
    """Keep only rows with ``step <= last_step`` (atomically), so that resuming from that
    step does not log the following steps twice. Unreadable lines (a row cut short by a
    crash) are dropped too."""
    kept = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            step = row.get("step") if isinstance(row, dict) else None
            if isinstance(step, int) and step > last_step:
                continue
            kept.append(line if line.endswith("\n") else line + "\n")
    folder, base = os.path.split(path)
    fd, tmp = tempfile.mkstemp(dir=folder or ".", prefix=f".{base}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.writelines(kept)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def build_jsonl(config: JsonlConfig, *, run_dir: str, resume_step: int | None = None, **context):
    return JsonlTracker(os.path.join(run_dir, config.filename), resume_step=resume_step)


# --------------------------------------------------------------------------- wandb

WandbMode = Literal["auto", "online", "offline", "disabled"]
_DEFAULT_WANDB_HOST = "https://api.wandb.ai"


@attrs.frozen
class WandbConfig:
    project: str = option("phase7fw", help="W&B project")
    entity: str | None = option(None, help="W&B team or user (default: your default entity)")
    mode: WandbMode = option(
        "auto",
        help="auto: WANDB_MODE if set, else online when an API key is set and W&B is reachable, else offline",
    )
    tags: list[str] = option(factory=list, help="run tags")
    dir: str = option("", help="where wandb writes its files (default: the run directory)")


def _wandb_host() -> tuple[str, int]:
    url = urlparse(os.environ.get("WANDB_BASE_URL") or _DEFAULT_WANDB_HOST)
    port = url.port or (80 if url.scheme == "http" else 443)
    return url.hostname or "api.wandb.ai", port


def _has_api_key(host: str) -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    path = os.environ.get("NETRC") or os.path.join(os.path.expanduser("~"), ".netrc")
    try:
        return netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _reachable(host: str, port: int, timeout: float = 2.0) -> bool:
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def resolve_wandb_mode(mode: str) -> tuple[str | None, str]:
    """The mode to pass to ``wandb.init`` (``None``: let wandb read WANDB_MODE) and why.

    ``auto`` checks the API key before the network, so that without a key nothing is
    contacted.
    """
    if mode != "auto":
        return mode, "set in the recipe"
    env_mode = os.environ.get("WANDB_MODE")
    if env_mode:
        return None, f"WANDB_MODE={env_mode} is set"
    host, port = _wandb_host()
    if not _has_api_key(host):
        return "offline", f"no API key (WANDB_API_KEY or a netrc entry for {host})"
    if not _reachable(host, port):
        return "offline", f"{host}:{port} is not reachable within 2 s"
    return "online", f"API key found and {host} is reachable"


def _new_run_id() -> str:
    # Same shape as wandb's own ids: 8 lowercase letters/digits.
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


class WandbTracker(Tracker):
    def __init__(self, run):
        self.run = run
        self._finished = False

    def log(self, row: dict) -> None:
        step, split, metrics = _numeric_metrics(row)
        if metrics:
            self.run.log({f"{split}/{k}": v for k, v in metrics.items()}, step=step)

    def state(self) -> dict:
        return {"run_id": self.run.id}

    def finish(self) -> None:
        if not self._finished:
            self._finished = True
            self.run.finish()


def build_wandb(
    config: WandbConfig,
    *,
    run_dir: str,
    run_name: str,
    recipe: dict,
    resume_state: dict | None = None,
    **context,
):
    try:
        import wandb
    except ImportError as exc:
        raise Phase7Error("the wandb tracker needs the wandb package: pip install 'phase7fw[wandb]'") from exc

    mode, why = resolve_wandb_mode(config.mode)
    chosen = mode or os.environ.get("WANDB_MODE", "")
    hint = " (upload later with `wandb sync`)" if chosen in ("offline", "dryrun") else ""
    print(f"phase7fw: wandb tracker mode {chosen}: {why}{hint}", file=sys.stderr)

    run_id = (resume_state or {}).get("run_id") or _new_run_id()
    wandb_dir = config.dir or run_dir
    os.makedirs(wandb_dir, exist_ok=True)
    run = wandb.init(
        project=config.project,
        entity=config.entity,
        name=run_name,
        id=run_id,
        resume="allow",
        config=recipe,
        dir=wandb_dir,
        mode=mode,
        tags=list(config.tags) or None,
    )
    return WandbTracker(run)


# --------------------------------------------------------------------------- tensorboard


@attrs.frozen
class TensorboardConfig:
    log_dir: str = option("", help="event file directory (default: <run_dir>/tensorboard)")
    flush_secs: int = option(10, check=positive, help="write pending events at least this often")


class TensorboardTracker(Tracker):
    def __init__(self, writer):
        self.writer = writer

    def log(self, row: dict) -> None:
        step, split, metrics = _numeric_metrics(row)
        for key, value in metrics.items():
            self.writer.add_scalar(f"{split}/{key}", value, global_step=step)

    def finish(self) -> None:
        self.writer.close()


def build_tensorboard(config: TensorboardConfig, *, run_dir: str, resume_step: int | None = None, **context):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise Phase7Error(
            "the tensorboard tracker needs the tensorboard package: pip install 'phase7fw[tensorboard]'"
        ) from exc
    # purge_step hides events a crashed run wrote after the checkpoint we resume from.
    purge = resume_step + 1 if resume_step is not None else None
    writer = SummaryWriter(
        log_dir=config.log_dir or os.path.join(run_dir, "tensorboard"),
        purge_step=purge,
        flush_secs=config.flush_secs,
    )
    return TensorboardTracker(writer)


@hookimpl
def register_components(register):
    register(
        "tracker", "jsonl", build_jsonl, JsonlConfig,
        description="one JSON object per logged row in <run_dir>/training_log.jsonl",
    )
    register(
        "tracker", "wandb", build_wandb, WandbConfig,
        description="Weights & Biases; offline when there is no API key or no network (needs phase7fw[wandb])",
    )
    register(
        "tracker", "tensorboard", build_tensorboard, TensorboardConfig,
        description="TensorBoard scalars in <run_dir>/tensorboard (needs phase7fw[tensorboard])",
    )
