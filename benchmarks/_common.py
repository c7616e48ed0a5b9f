"""What every benchmark script shares: where results go, the machine/versions/date/command block
each results file carries, and timing with the device synchronised.

The scripts import it as `from _common import ...`: run as `python benchmarks/x.py`, the
script's own folder is first on sys.path.
"""

from __future__ import annotations

import datetime
import json
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


def write_results(name: str, result: dict, markdown: str) -> None:
    """benchmarks/results/<name>.json and .md (or under POLOPT_BENCH_RESULTS); prints the markdown."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    (RESULTS / f"{name}.md").write_text(markdown.rstrip("\n") + "\n")
    print(markdown)


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


# Two-sided 95% critical values of Student's t, t_{0.975, df}, df = 1..30, to three decimals, from
# the NIST/SEMATECH e-Handbook of Statistical Methods, section 1.3.6.7.2 ("Critical values of the
# Student's t distribution", column 0.975). Beyond df = 30 the normal quantile 1.960 is used
# (t_{0.975, 60} = 2.000, t_{0.975, 120} = 1.980: within 2%).
T_975 = {
    1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
    11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
    20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060, 26: 2.056, 27: 2.052, 28: 2.048,
    29: 2.045, 30: 2.042,
}


def mean_ci95(xs: list[float]) -> tuple[float, float, float]:
    """Mean and its two-sided 95% Student-t interval (lo, hi); (mean, nan, nan) for fewer than 2 values."""
    mean = statistics.fmean(xs)
    if len(xs) < 2:
        return mean, float("nan"), float("nan")
    half = T_975.get(len(xs) - 1, 1.960) * statistics.stdev(xs) / len(xs) ** 0.5
    return mean, mean - half, mean + half
