"""benchmarks/gpu_check.sh is run on a lent GPU machine, rarely: its CPU smoke mode runs the same
three benchmark scripts at toy sizes here, so that a change to any of them cannot leave the GPU
check broken until the next GPU session finds out."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_cpu_smoke_writes_every_result(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "POLOPT_BENCH_RESULTS": str(tmp_path)}
    env.pop("OUT", None)
    proc = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--cpu-smoke"],
        env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in ("logprob_memory.md", "logprob_memory.json", "step_throughput.md",
                 "rollout_throughput.md", "rollout_throughput.json", "gpu_check.log"):
        assert (tmp_path / name).stat().st_size > 0, name
    # Each results file names the machine and the command that produced it.
    rollout = json.loads((tmp_path / "rollout_throughput.json").read_text())
    assert rollout["command"].startswith("python benchmarks/rollout_throughput.py")
    assert "!!" not in (tmp_path / "gpu_check.log").read_text()
    # The committed results were not touched.
    assert not (REPO / "benchmarks" / "results" / "gpu_check").exists()
