"""What every benchmark script shares: where results go, the machine/versions/date/command block
each results file carries, and timing with the device synchronised.

The scripts import it as `from _common import ...`: run as `python benchmarks/x.py`, the
script's own folder is first on sys.path.
"""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
# POLOPT_BENCH_RESULTS redirects every script's results (gpu_check.sh's smoke run writes to a temp dir).
RESULTS = Path(os.environ.get("POLOPT_BENCH_RESULTS") or REPO / "benchmarks" / "results")


def environment(device: str) -> dict:
    """Machine, versions, date and exact command, for every results file."""
    gpu = device.startswith("cuda")
    script = Path(sys.argv[0])
    return {
        "device": device,
        "device_name": torch.cuda.get_device_name() if gpu else (platform.processor() or platform.machine()),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda if gpu else None,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python " + shlex.join([str(script.relative_to(REPO)) if script.is_absolute() else str(script), *sys.argv[1:]]),
    }


def synchronize(device: str) -> None:
    """Wait for queued GPU work, so that wall-clock time covers it (no-op on CPU)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_call(step, device: str, repeats: int) -> dict[str, float]:
    """Median and fastest seconds of `step()` over `repeats` runs after 3 warm-ups."""
    for _ in range(3):
        step()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return {"seconds": statistics.median(times), "min_seconds": min(times)}
