"""CPU threads: how many, and how they wait.

On a small shared machine the defaults can make a CPU run many times slower: OpenMP's
worker threads spin while they wait, so when other processes hold the cores every parallel
region waits for a descheduled spinner (measured on a busy 2-core box: 3-8 s per step of
phase7_tiny with 2 spinning threads, 0.5-0.6 s with 1 thread or with passive waiting). So:

- :func:`prepare_environment` (the CLI calls it before torch is imported) makes OpenMP
  threads sleep while they wait (``OMP_WAIT_POLICY=PASSIVE``) unless the user set a policy;
- :func:`configure` uses at most the CPUs this process may run on (its affinity and a
  container's CPU quota, split among the job's processes on this host) unless the user chose
  a number (``OMP_NUM_THREADS``).
"""

from __future__ import annotations

import math
import os
from pathlib import Path


def prepare_environment() -> None:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def available_cpus() -> int:
    """CPUs this process may use: its affinity mask, lowered by a cgroup CPU quota."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    try:  # cgroup v2: "max 100000" or "200000 100000"
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            n = min(n, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, n)


def configure(device_type: str) -> int:
    """Set torch's intra-op threads for a run on ``device_type``; returns the number used."""
    import torch

    if os.environ.get("OMP_NUM_THREADS") or device_type != "cpu":
        return torch.get_num_threads()
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))  # torchrun processes on this host
    want = max(1, available_cpus() // local)
    if torch.get_num_threads() > want:
        torch.set_num_threads(want)
    return torch.get_num_threads()
