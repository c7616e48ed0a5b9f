"""benchmarks/step_roofline.py: its FLOP counter sees the CPU attention kernel, and the script runs
end to end on its three sides (polopt, polopt packed, TRL), so that a change to the recipe, the
packing or TRL's trainer cannot leave it broken."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from step_roofline import flop_counter  # noqa: E402


def test_flop_counter_counts_cpu_attention_forward_and_backward():
    B, H, L, D = 2, 3, 5, 4
    q, k, v = (torch.randn(B, H, L, D, requires_grad=True) for _ in range(3))
    mask = torch.ones(L, L, dtype=torch.bool).tril()
    with flop_counter() as counter:
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert counter.get_total_flops() == 2 * (2 * B * H * L * L * D)  # Q·Kᵀ and P·V
    with flop_counter() as counter:
        out.sum().backward()
    # Q·Kᵀ again, then dV = Pᵀ·dO, dP = dO·Vᵀ, dQ = dS·K, dK = dSᵀ·Q (torch's formula for the GPU kernels).
    assert counter.get_total_flops() == 5 * (2 * B * H * L * L * D)


def test_step_roofline_runs_every_side(tmp_path):
    env = {**os.environ, "POLOPT_BENCH_RESULTS": str(tmp_path), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "step_roofline.py"), "--rounds", "1", "--steps", "3", "--name", "roofline"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "roofline.json").read_text())
    assert set(result["sides"]) == {"polopt", "polopt packed", "trl"}
    for side in result["sides"].values():
        assert side["flops"]["rollout"] > 0 and side["flops"]["update"] > side["flops"]["rollout"]
        assert all(seconds > 0 for seconds in side["cpu_seconds"].values())
    # The same step on both sides: the same number of answers, about the same length.
    tokens = [side["answer_tokens_counted"] for side in result["sides"].values()]
    assert min(tokens) > 0
    for bound in result["bounds"].values():
        assert bound["least_cpu_seconds"] < bound["measured_cpu_seconds"]  # nothing runs above the peak
    assert "| trl | **step** |" in (tmp_path / "roofline.md").read_text()
