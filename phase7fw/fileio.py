"""Writing files: atomic replacement, and disk errors as one clear message.

A full disk, a read-only folder or a quota end a run with ``no space left on DEVICE while
writing PATH`` / ``PATH is read-only`` (exit code 2) instead of a traceback; every writer of
phase7fw wraps its writes in :func:`writing`, and files that must never be seen half-written
go through :func:`write_text_atomic` (temporary file in the same folder, fsync, rename).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
from pathlib import Path

from phase7fw.errors import Phase7Error

_NO_SPACE = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
_READ_ONLY = {errno.EROFS: "read-only filesystem", errno.EACCES: "permission denied", errno.EPERM: "not permitted"}


class DiskError(Phase7Error):
    """A write failed because of the disk or the folder, not because of the input."""


def disk_error(exc: OSError, path: str | os.PathLike) -> DiskError:
    """The one-line message for an OSError met while writing ``path``."""
    if exc.errno in _NO_SPACE:
        what = "quota exceeded" if exc.errno != errno.ENOSPC else "no space left"
        return DiskError(f"{what} on {device_of(path)} while writing {path}; free some space (or write elsewhere)"
                         " and run again")
    if exc.errno in _READ_ONLY:
        where = exc.filename or path
        return DiskError(f"{where} is read-only ({_READ_ONLY[exc.errno]}); cannot write {path}")
    if exc.errno in (errno.ENOTDIR, errno.EEXIST):  # a folder on the way is a file
        blocker = next((p for p in Path(os.path.abspath(path)).parents if p.exists() and not p.is_dir()), None)
        if blocker is not None:
            return DiskError(f"cannot write {path}: {blocker} is a file, not a folder")
    return DiskError(f"cannot write {path}: {exc.strerror or exc}")


@contextlib.contextmanager
def writing(path: str | os.PathLike):
    """Turn an OSError raised inside into :func:`disk_error` for ``path``."""
    try:
        yield
    except OSError as exc:
        raise disk_error(exc, path) from None


def device_of(path: str | os.PathLike) -> str:
    """The filesystem holding ``path``: its device and mount point when /proc/mounts says."""
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    mount = p
    while not os.path.ismount(mount) and mount != mount.parent:
        mount = mount.parent
    try:
        with open("/proc/mounts", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                parts = line.split()
                if len(parts) > 1 and parts[1] == str(mount):
                    return f"{parts[0]} (mounted at {mount})"
    except OSError:
        pass
    return f"the filesystem mounted at {mount}"


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file renamed into place; a failure
    leaves the old file (if any) and no temporary file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(tmp, "w", encoding="utf-8") as fh:
                fh.write(text)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def digest(obj) -> str:
    """A stable short hash of JSON-able data (dict key order does not matter)."""
    text = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:20]
