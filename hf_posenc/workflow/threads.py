"""How many torch threads a command runs with on the CPU: the cores other processes leave free."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import torch


def choose_threads(requested: int | None = None, sample_seconds: float = 0.5) -> int:
    """torch's intra-op threads: `requested`, else the cores that other processes leave free: all cores less those
    busy over `sample_seconds` (from /proc/stat, while this process sleeps; the 1-minute load average where there is
    no /proc/stat), at least 1. A thread on a core another process holds makes every parallel region wait for it: on a
    2-core machine with one other busy process, torch's default 2 threads trained several times slower per step than 1
    (README, "Times and threads"; `scripts/thread_bench.py`).

    A count set for the process already is kept: `OMP_NUM_THREADS` (which `torchrun` and `accelerate launch` set for
    each of several processes), or a launch of several processes (WORLD_SIZE > 1), where each process would otherwise
    count the same free cores as its own."""
    if requested is not None:
        return requested
    if "OMP_NUM_THREADS" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    busy = _busy_cores(sample_seconds, cores)
    return max(1, min(cores, int(cores - busy + 0.5)))


def _busy_cores(seconds: float, cores: int) -> float:
    """How many cores other processes kept busy over the last `seconds` (this one sleeps meanwhile)."""
    stat = Path("/proc/stat")
    if not stat.exists():
        try:
            return os.getloadavg()[0]
        except (AttributeError, OSError):  # no load average on this platform either: assume idle
            return 0.0

    def sample():
        fields = [int(v) for v in stat.read_text().splitlines()[0].split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields), idle

    total_before, idle_before = sample()
    time.sleep(seconds)
    total_after, idle_after = sample()
    elapsed = max(1, total_after - total_before)
    return cores * (1 - (idle_after - idle_before) / elapsed)


@contextlib.contextmanager
def torch_threads(requested: int | None = None):
    """torch's intra-op threads set to `choose_threads(requested)` for the block, and restored after it."""
    before = torch.get_num_threads()
    torch.set_num_threads(choose_threads(requested))
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
