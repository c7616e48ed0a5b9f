"""Process-level settings the recipes share."""

from __future__ import annotations

import os
from typing import Optional

import torch

from polopt.errors import ConfigError


def set_cpu_threads(num_threads: Optional[int], device: torch.device, processes_per_rank: int = 1) -> int:
    """Set torch's intra-op threads for a CPU run and return the count.

    `num_threads=None` takes this process's share of the cores it may run on (its CPU affinity
    divided by the processes torchrun started on this node, times `processes_per_rank`: 2 when each
    rank has a rollout producer process beside it), unless OMP_NUM_THREADS is set, which
    then wins. More threads than cores is what makes a busy CPU slow: threads that wait for each
    other's core cost far more than they add. GPU runs keep torch's default.
    """
    if num_threads is not None and (not isinstance(num_threads, int) or num_threads < 1):
        raise ConfigError(f"num_threads must be a positive integer or null (one share of the cores), got {num_threads!r}",
                          "num_threads")
    if device.type != "cpu":
        return torch.get_num_threads()
    if num_threads is None:
        if os.environ.get("OMP_NUM_THREADS"):
            return torch.get_num_threads()
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1))) * processes_per_rank
        num_threads = max(1, cores // processes)
    torch.set_num_threads(num_threads)
    return num_threads
