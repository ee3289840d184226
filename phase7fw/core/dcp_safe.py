"""Reading sharded (torch.distributed.checkpoint) folders without running code from them.

A DCP folder holds a ``.metadata`` pickle and ``*.distcp`` data files whose non-tensor items
(optimizer hyper-parameters) are ``torch.save`` blobs. torch reads the first with a plain
``pickle.load`` and the second with ``torch.load(weights_only=False)``: a folder from
elsewhere could run any code on load. Here the metadata goes through an allow-list
unpickler (only DCP's metadata classes, torch sizes/dtypes/layouts, paths and builtin
containers) and byte items through ``torch.load(weights_only=True)``; everything else is a
:class:`CheckpointError`. Every DCP read of phase7fw goes through :func:`load_sharded` or
:func:`load_full`.
"""

from __future__ import annotations

import io
import os
import pickle
import re
import warnings
from pathlib import Path

import torch

from phase7fw.errors import CheckpointError

METADATA_FILE = ".metadata"

_DCP_META = "torch.distributed.checkpoint.metadata"
#: (module, name) pairs the metadata pickle may reference: exactly what torch 2.13's
#: ``FileSystemWriter`` writes, plus builtin containers.
ALLOWED = frozenset(
    {(_DCP_META, n) for n in ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
                              "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")}
    | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
       ("torch.serialization", "_get_layout"), ("collections", "OrderedDict")}
    | {("pathlib", n) for n in ("Path", "PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath")}
    | {("builtins", n) for n in ("dict", "list", "tuple", "set", "frozenset", "bytes", "bytearray", "str", "int",
                                 "float", "bool", "complex")}
)


class _Refused(pickle.UnpicklingError):
    """A global outside the allow-list (as opposed to a damaged pickle)."""


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in ALLOWED or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise _Refused(f"it references {module}.{name}, which is not a checkpoint metadata class")


def read_metadata(folder: str | os.PathLike):
    """The DCP metadata of ``folder``, unpickled with the allow-list; checked to describe
    files inside the folder only."""
    from torch.distributed.checkpoint.metadata import Metadata

    path = Path(folder) / METADATA_FILE
    try:
        with open(path, "rb") as fh:
            metadata = _MetadataUnpickler(fh).load()
    except FileNotFoundError:
        raise CheckpointError(f"{folder} is not a sharded checkpoint: {METADATA_FILE} is missing") from None
    except _Refused as exc:
        raise CheckpointError(
            f"refusing to load {path}: {exc}. phase7fw never unpickles arbitrary objects from a checkpoint"
        ) from None
    except Exception as exc:  # noqa: BLE001 - truncated or garbage pickles raise anything
        raise CheckpointError(f"{path} is corrupt or truncated: {type(exc).__name__}: {exc}") from None
    if not isinstance(metadata, Metadata) or not isinstance(metadata.state_dict_metadata, dict):
        raise CheckpointError(f"{path} is not torch.distributed.checkpoint metadata")
    for item in (metadata.storage_data or {}).values():
        rel = getattr(item, "relative_path", None)
        if not isinstance(rel, str) or Path(rel).name != rel or rel in (".", "..", ""):
            raise CheckpointError(f"{path} points outside its folder ({rel!r}); refusing to read it")
    return metadata


def _reader(folder):
    from torch.distributed.checkpoint import FileSystemReader

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            if kwargs.get("rank") is not None:  # per-rank metadata files are never written by phase7fw
                raise CheckpointError(f"{folder}: no per-rank metadata")
            metadata = read_metadata(self.path)
            from torch.distributed.checkpoint.metadata import StorageMeta

            metadata.storage_meta = metadata.storage_meta or StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(str(folder))


def _safe_load_bytes(value: io.BytesIO, where) -> object:
    try:
        return torch.load(value, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"refusing to load {where}: a non-tensor item is not plain data"
                              f" ({weights_only_reason(exc)})."
                              " phase7fw never unpickles arbitrary objects from a checkpoint") from None


def _planner(base, where):
    class SafePlanner(base):
        def load_bytes(self, read_item, value) -> None:
            # DefaultLoadPlanner.load_bytes does this with weights_only=False.
            from torch.distributed.checkpoint._traverse import set_element

            obj = _safe_load_bytes(value, where)
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
            else:
                self.state_dict[read_item.dest_index.fqn] = obj

    return SafePlanner()


def _unwrap(exc: BaseException, folder) -> CheckpointError:
    """DCP wraps every rank's failure in a CheckpointException: surface ours as one message."""
    for failure in getattr(exc, "failures", {}).values():
        inner = failure[0] if isinstance(failure, tuple) else failure
        if isinstance(inner, CheckpointError):
            return inner
        if isinstance(inner, AssertionError) and "metadata" in str(inner):
            continue
        return CheckpointError(f"{folder} cannot be read as a sharded checkpoint: {type(inner).__name__}: {inner}")
    return CheckpointError(f"{folder} cannot be read as a sharded checkpoint: {exc}")


def load_sharded(target: dict, folder: str | os.PathLike) -> None:
    """``dcp.load(target, folder)`` with the safe metadata reader and byte loader; every
    rank of the process group calls it (the metadata is checked first on each rank)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint.api import CheckpointException

    read_metadata(folder)  # a clear error on every rank before any collective starts
    try:
        dcp.load(target, storage_reader=_reader(folder), planner=_planner(DefaultLoadPlanner, folder))
    except CheckpointException as exc:
        raise _unwrap(exc, folder) from None


def load_full(folder: str | os.PathLike) -> dict:
    """Every tensor and item of a DCP folder, in one process (no process group)."""
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict  # what dcp_to_torch_save uses

    read_metadata(folder)
    state: dict = {}
    try:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            _load_state_dict(state, storage_reader=_reader(folder),
                             planner=_planner(_EmptyStateDictLoadPlanner, folder), no_dist=True)
    except CheckpointException as exc:
        raise _unwrap(exc, folder) from None
    except CheckpointError:
        raise
    except (RuntimeError, ValueError, KeyError, OSError, EOFError, AssertionError) as exc:
        raise CheckpointError(f"{folder} cannot be read as a sharded checkpoint: {type(exc).__name__}: {exc}") from None
    return state


def weights_only_reason(exc: BaseException) -> str:
    """The one line of torch's long weights-only refusal that says what was refused."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    for line in text.splitlines():
        if "WeightsUnpickler error:" in line:
            return line.split("WeightsUnpickler error:", 1)[1].split(". Please", 1)[0].strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__
