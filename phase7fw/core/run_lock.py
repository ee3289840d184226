"""One run per output folder: an exclusive lock file, ``<output_dir>/.phase7fw.lock``.

The lock is an ``flock`` on that file, held while the run trains; the file records who holds
it (pid, host, start time, command). The kernel drops an ``flock`` when its process dies, so
a lock left by a killed run is stale by construction and the next run takes it over. Where
``fcntl`` does not exist (Windows) the file is created exclusively and a recorded pid that no
longer runs on this host counts as stale.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

from phase7fw.errors import Phase7Error
from phase7fw.fileio import writing

LOCK_NAME = ".phase7fw.lock"


class RunLocked(Phase7Error):
    """Another live run holds the output folder."""


class RunLock:
    def __init__(self, output_dir: str | os.PathLike):
        self.path = Path(output_dir) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        with writing(self.path):  # the first write of a run: a read-only or full folder stops here
            self.path.parent.mkdir(parents=True, exist_ok=True)
            return self._acquire()

    def _acquire(self) -> "RunLock":
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            return self._acquire_exclusive()
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                raise RunLocked(self._held_message()) from None
            # The previous holder may have removed the file between our open and our flock:
            # then we locked an orphan inode; start over on the current file.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(_me()).encode())
        os.fsync(fd)
        self._fd = fd
        return self

    def _acquire_exclusive(self) -> "RunLock":  # pragma: no cover - Windows
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder = _read(self.path)
                if holder.get("host") == socket.gethostname() and not _alive(holder.get("pid")):
                    self.path.unlink(missing_ok=True)  # stale: its process is gone
                    continue
                raise RunLocked(self._held_message()) from None
            os.write(fd, json.dumps(_me()).encode())
            self._fd = fd
            return self
        raise RunLocked(self._held_message())

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # while still locked: nobody can take the old file
        except OSError:
            pass
        os.close(self._fd)  # drops the flock
        self._fd = None

    def _held_message(self) -> str:
        holder = _read(self.path)
        who = (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started {holder.get('started', '?')}"
               if holder else "a process that is still starting")
        cmd = f" ({holder['command']})" if holder.get("command") else ""
        return (f"{self.path.parent} is in use by another phase7fw run: {who}{cmd}. Two runs in one folder"
                " would overwrite each other's log and checkpoints; wait for it to finish, stop it, or set another"
                f" run.output_dir (the lock is {self.path})")

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _me() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join(sys.argv)[:300]}


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _alive(pid) -> bool:  # pragma: no cover - Windows
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, ValueError, TypeError):
        return False
    except OSError:
        return True
    return True
