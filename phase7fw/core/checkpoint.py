"""Checkpoint files: pinned names, atomic writes, safe (weights-only) loading.

A checkpoint is one ``torch.save`` file holding only tensors and plain containers, so it
loads with ``torch.load(weights_only=True)``: nothing in it can run code.
"""

from __future__ import annotations

import os
import pickle
import re
import tempfile
import zipfile
from pathlib import Path

import torch

from phase7fw.core.dcp_safe import weights_only_reason
from phase7fw.errors import CheckpointError, Phase7Error
from phase7fw.fileio import disk_error, writing

FORMAT = "phase7fw-checkpoint"
FORMAT_VERSION = 1


def checkpoint_path(output_dir: str | os.PathLike, model_name: str, tag: str | int) -> Path:
    """``{model}_step_{N}.pt`` for an int tag, ``{model}_{tag}.pt`` for "best"/"final"."""
    name = f"{model_name}_step_{tag}.pt" if isinstance(tag, int) else f"{model_name}_{tag}.pt"
    return Path(output_dir) / name


def save_checkpoint(path: str | os.PathLike, state: dict) -> Path:
    """Write ``state`` atomically: temporary file in the same folder, fsync, rename. A full
    disk or a read-only folder is a :class:`~phase7fw.fileio.DiskError` and leaves no file."""
    path = Path(path)
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, **state}
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                writer = _Writer(fh)
                try:
                    torch.save(payload, writer)
                except Exception:
                    if writer.error is not None:  # torch reports a failed write as "unexpected pos"
                        raise writer.error from None
                    raise
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass
    return path


class _Writer:
    """The file torch.save writes to. torch swallows an OSError raised by ``write`` and fails
    later with an unrelated message; this keeps the OSError (a full disk) to raise instead."""

    def __init__(self, fh):
        self.fh, self.error = fh, None

    def write(self, data) -> int:
        try:
            return self.fh.write(data)
        except OSError as exc:
            self.error = self.error or exc
            raise

    def flush(self) -> None:
        self.fh.flush()


def save_sharded_checkpoint(path: str | os.PathLike, tensors: dict, extra: dict, ctx) -> Path:
    """An FSDP checkpoint: a directory ``path`` with every rank's shards of ``tensors``
    (torch.distributed.checkpoint) and ``extra.pt`` (rank 0's plain state). Written into a
    temporary directory that rank 0 renames once every rank has finished."""
    import shutil

    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    from torch.distributed.checkpoint.api import CheckpointException

    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp"
    if ctx.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        with writing(tmp):
            tmp.mkdir(parents=True)
    if ctx.distributed:
        dist.barrier()
    try:
        dcp.save(tensors, checkpoint_id=str(tmp))
    except CheckpointException as exc:  # every rank gets every rank's failure
        if ctx.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        for failure in exc.failures.values():
            inner = failure[0] if isinstance(failure, tuple) else failure
            if isinstance(inner, OSError):
                raise disk_error(inner, path) from None
        raise
    rng = [None] * ctx.world_size
    if ctx.distributed:
        dist.all_gather_object(rng, extra["rng"])
    else:
        rng = [extra["rng"]]
    if ctx.is_main:
        try:
            save_checkpoint(tmp / "extra.pt", {**extra, "sharded": True, "rng_per_rank": rng})
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        old = path.parent / f".{path.name}.old"
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    if ctx.distributed:
        dist.barrier()
    return path


def remove_interrupted_saves(output_dir: str | os.PathLike) -> list[str]:
    """Clean up after saves that a killed process left half done: temporary checkpoint files
    and folders are removed, and a sharded checkpoint caught between its two renames gets its
    previous version back. Only while no live run holds the folder (its lock is taken for
    the clean-up; a folder in use or not writable is left alone). Returns what was done."""
    from phase7fw.fileio import DiskError
    from phase7fw.core.run_lock import RunLock, RunLocked

    if not Path(output_dir).is_dir():
        return []
    try:
        lock = RunLock(output_dir).acquire()
    except (RunLocked, DiskError):
        return []
    try:
        with writing(output_dir):
            return _remove_interrupted_saves(Path(output_dir))
    finally:
        lock.release()


def _remove_interrupted_saves(folder: Path) -> list[str]:
    import shutil

    done: list[str] = []
    for old in folder.glob(".*.old"):
        name = folder / old.name[1 : -len(".old")]
        if not name.exists():  # killed after moving the old version aside: put it back
            os.replace(old, name)
            done.append(f"restored {name.name} (a save was interrupted)")
        else:
            shutil.rmtree(old, ignore_errors=True)
    for tmp in folder.glob(".*.tmp"):
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        done.append(f"removed {tmp.name} (left by an interrupted save)")
    return done


def load_checkpoint(path: str | os.PathLike, map_location="cpu", mmap: bool = False) -> dict:
    """Load a phase7fw checkpoint safely; every failure is a :class:`CheckpointError`.

    ``mmap=True`` maps the file instead of reading it: tensors are read when used (taking
    the weights of a large checkpoint does not read its optimizer state).

    For a sharded (FSDP) checkpoint directory this returns its plain state with
    ``sharded=True`` and ``path``; the tensors are read by the engine with DCP."""
    path = Path(path)
    if path.is_dir():
        if not (path / "extra.pt").is_file():
            raise CheckpointError(f"{path} is a directory but not a sharded phase7fw checkpoint (no extra.pt)")
        state = load_checkpoint(path / "extra.pt", map_location)
        return {**state, "sharded": True, "path": str(path)}
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; truncation breaks it
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated (not a torch zip archive)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"refusing to load {path}: it is not a plain tensor checkpoint (weights-only loading"
            f" rejected it: {weights_only_reason(exc)}). phase7fw never unpickles arbitrary objects."
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated: {exc}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a phase7fw checkpoint")
    if state.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format {state['format_version']}, newer than this phase7fw"
            f" understands ({FORMAT_VERSION}); upgrade phase7fw"
        )
    problem = field_problem(state)
    if problem:
        raise CheckpointError(f"{path} is damaged or was edited by hand: {problem}")
    return state


def _int(v) -> bool:
    return type(v) is int


def _tensor_dict(v) -> bool:
    return isinstance(v, dict) and all(isinstance(k, str) and isinstance(t, torch.Tensor) for k, t in v.items())


def _rng(v) -> bool:
    def byte_tensor(t):
        return isinstance(t, torch.Tensor) and t.dtype == torch.uint8 and t.dim() == 1

    return isinstance(v, dict) and byte_tensor(v.get("torch", torch.zeros(0, dtype=torch.uint8))) and (
        "cuda" not in v or isinstance(v["cuda"], (list, tuple)) and all(map(byte_tensor, v["cuda"])))


def _metrics(v) -> bool:
    numbers = {"best_val_loss": (int, float), "skipped_steps": int, "tokens_seen": int}
    return isinstance(v, dict) and all(k not in v or type(v[k]) in (kind if isinstance(kind, tuple) else (kind,))
                                       for k, kind in numbers.items())


def _data(v) -> bool:
    return v is None or isinstance(v, dict) and _int(v.get("position")) and v["position"] >= 0


#: what each field of a checkpoint must be, when present (a description and a test)
FIELDS = {
    "step": ("an integer >= 0", lambda v: _int(v) and v >= 0),
    "max_steps": ("an integer >= 1", lambda v: _int(v) and v >= 1),
    "world_size": ("an integer >= 1", lambda v: _int(v) and v >= 1),
    "model_name": ("a string", lambda v: isinstance(v, str)),
    "strategy": ("a string", lambda v: isinstance(v, str)),
    "recipe": ("the TOML text of a recipe", lambda v: isinstance(v, str)),
    "model": ("a table of named tensors", _tensor_dict),
    "optimizer": ("an optimizer state (state, param_groups)",
                  lambda v: isinstance(v, dict) and isinstance(v.get("state", {}), dict)
                  and isinstance(v.get("param_groups", []), list)),
    "lr_scheduler": ("a table", lambda v: isinstance(v, dict)),
    "curvature_scheduler": ("a table or nothing", lambda v: v is None or isinstance(v, dict)),
    "grad_scaler": ("a table or nothing", lambda v: v is None or isinstance(v, dict)),
    "rng": ("RNG states (uint8 tensors)", _rng),
    "rng_per_rank": ("a list of RNG states", lambda v: v is None or isinstance(v, list) and all(map(_rng, v))),
    "data": ("a sampler position (a table with position >= 0)", _data),
    "trackers": ("a table", lambda v: isinstance(v, dict)),
    "tokenizer": ("a table or nothing", lambda v: v is None or isinstance(v, dict)),
    "tokenizer_fingerprint": ("a string or nothing", lambda v: v is None or isinstance(v, str)),
    "metrics": ("a table of numbers", _metrics),
}


def field_problem(state: dict) -> str | None:
    """The first field of ``state`` with the wrong type, as a message (None: all fine)."""
    for name, (what, ok) in FIELDS.items():
        if name in state and not ok(state[name]):
            got = type(state[name]).__name__
            return f"{name!r} must be {what}, it is a {got}" + (
                f" ({state[name]!r})" if isinstance(state[name], (str, int, float)) and len(repr(state[name])) < 40 else "")
    return None


def upgrade_shapes(model_state: dict, optim_state: dict | None, shapes: dict[str, tuple]) -> tuple[dict, dict | None]:
    """Reshape parameters saved with an older, equivalent shape to the model's current one.

    Equivalent means the same values in a shape that differs only by size-1 dimensions: the
    phase7 attention's ``log_c`` was a 0-dim scalar before FSDP2 support made it ``(1,)``.
    Optimizer state tensors of such a parameter that had its old shape are reshaped too
    (keyed by parameter name, the layout of every phase7fw checkpoint). Anything else is
    left for the loader to report."""
    def squeezed(shape) -> tuple:
        return tuple(d for d in shape if d != 1)

    renamed = {}
    for name, new in shapes.items():
        old = model_state.get(name)
        if isinstance(old, torch.Tensor) and tuple(old.shape) != tuple(new) and squeezed(old.shape) == squeezed(new):
            renamed[name] = tuple(old.shape)
    if not renamed:
        return model_state, optim_state
    model_state = {k: v.reshape(shapes[k]) if k in renamed else v for k, v in model_state.items()}
    states = (optim_state or {}).get("state")
    if isinstance(states, dict):
        states = dict(states)
        for name, old_shape in renamed.items():
            if isinstance(states.get(name), dict):
                states[name] = {k: v.reshape(shapes[name]) if isinstance(v, torch.Tensor) and tuple(v.shape) == old_shape
                                else v for k, v in states[name].items()}
        optim_state = {**optim_state, "state": states}
    return model_state, optim_state


_STEP_RE = re.compile(r"_step_(\d+)\.pt$")


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The checkpoint to resume from: the highest step among ``*_step_N.pt`` and ``*_final.pt``."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return None
    best: tuple[int, int, Path] | None = None
    for p in folder.glob("*.pt"):
        m = _STEP_RE.search(p.name)
        if m:
            key = (int(m.group(1)), 0, p)
        elif p.name.endswith("_final.pt"):
            step = load_checkpoint(p).get("step", 0)
            key = (int(step), 1, p)  # on a tie the final checkpoint wins
        else:
            continue
        if best is None or key[:2] > best[:2]:
            best = key
    return best[2] if best else None


def consolidate(src: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Turn a sharded (FSDP) checkpoint directory into one file that a single process loads
    (chat, eval, generate, ``Engine.from_checkpoint``). Needs no process group; the folder is
    read without unpickling anything but plain data (phase7fw/core/dcp_safe.py)."""
    from phase7fw.core.dcp_safe import load_full

    src, out = Path(src), Path(out)
    extra = load_checkpoint(src)
    if not extra.get("sharded"):
        raise CheckpointError(f"{src} is already a single-file checkpoint")
    tensors = load_full(src)
    for key in ("model", "optimizer"):
        if not isinstance(tensors.get(key), dict):
            raise CheckpointError(f"{src} holds no {key} state; it was not written by phase7fw")
    skip = {"sharded", "path", "rng_per_rank", "format", "format_version"}
    state = {k: v for k, v in extra.items() if k not in skip}
    return save_checkpoint(out, {**state, "model": tensors["model"], "optimizer": tensors["optimizer"]})


# ---------------------------------------------------------------------------- which checkpoint of a run
def _rank(path: Path) -> tuple:
    """Preference within a run: best > final > the highest step."""
    if path.name.endswith("_best.pt"):
        return (2, 0)
    if path.name.endswith("_final.pt"):
        return (1, 0)
    m = _STEP_RE.search(path.name)
    return (0, int(m.group(1))) if m else None


def checkpoint_in_run(run_dir: Path) -> Path | None:
    """The checkpoint of a run folder to load (chat, eval, export, init_from): ``*_best.pt``, else ``*_final.pt``, else the
    latest ``*_step_N.pt`` (the newest file wins a tie between model names)."""
    found = [(r, p.stat().st_mtime, p) for p in run_dir.glob("*.pt") if (r := _rank(p)) is not None]
    return max(found)[2] if found else None


def find_checkpoint(target: str | None, runs_dir: str = "runs") -> Path:
    """A checkpoint file from what the user gave: a file (as is), a run folder (see
    :func:`checkpoint_in_run`), or a folder of runs / nothing (the newest run under
    ``runs_dir``: the one whose newest checkpoint was written last)."""
    if target is not None and (not Path(target).is_dir() or target.rstrip("/").endswith(".pt")):
        return Path(target)  # a file or a sharded checkpoint folder; loading reports a bad one
    folder = Path(target) if target is not None else Path(runs_dir)
    if not folder.is_dir():
        raise Phase7Error(f"no checkpoint given and {folder}/ does not exist; pass a CHECKPOINT or RUN_DIR"
                          " (or --runs-dir)")
    own = checkpoint_in_run(folder)
    if own is not None:
        return own
    runs = []
    for run in folder.iterdir():
        if run.is_dir() and (ckpt := checkpoint_in_run(run)) is not None:
            runs.append((max(p.stat().st_mtime for p in run.glob("*.pt")), run.name, ckpt))
    if not runs:
        raise Phase7Error(f"no checkpoints (*_best.pt, *_final.pt, *_step_N.pt) in {folder}/ or its run folders")
    return max(runs)[2]
