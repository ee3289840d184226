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

from phase7fw.errors import CheckpointError

FORMAT = "phase7fw-checkpoint"
FORMAT_VERSION = 1


def checkpoint_path(output_dir: str | os.PathLike, model_name: str, tag: str | int) -> Path:
    """``{model}_step_{N}.pt`` for an int tag, ``{model}_{tag}.pt`` for "best"/"final"."""
    name = f"{model_name}_step_{tag}.pt" if isinstance(tag, int) else f"{model_name}_{tag}.pt"
    return Path(output_dir) / name


def save_checkpoint(path: str | os.PathLike, state: dict) -> Path:
    """Write ``state`` atomically: temporary file in the same folder, fsync, rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, **state}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(payload, fh)
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


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Load a phase7fw checkpoint safely; every failure is a :class:`CheckpointError`."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory; give a checkpoint file (*.pt)")
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; truncation breaks it
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated (not a torch zip archive)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"refusing to load {path}: it is not a plain tensor checkpoint (weights-only loading"
            f" rejected it: {first}). phase7fw never unpickles arbitrary objects."
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
    return state


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
