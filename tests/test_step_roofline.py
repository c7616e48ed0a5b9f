"""benchmarks/step_roofline.py: its FLOP counter sees the CPU attention kernel, its op meter books
each op's FLOPs to the innermost phase running, and the script runs end to end on its three sides
(polopt, polopt packed, TRL) on the tiny model, so that a change to the recipe, the packing or TRL's
trainer cannot leave it broken. (The same code runs SmolLM2 with `--config
configs/smollm2_addition.yaml`; a step of that model costs a minute of CPU, too much for the suite.)"""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from step_roofline import PhaseMeter, flop_counter  # noqa: E402


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


def test_op_meter_books_flops_to_the_innermost_phase_as_the_flop_counter_counts_them():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8))
    x = torch.randn(4, 8)
    q, k, v = (torch.randn(2, 3, 5, 4, requires_grad=True) for _ in range(3))

    class Step:
        def attention(self):  # booked as old log-probs only when called inside the update
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).sum()

        def update(self):
            (model(x).sum() + self.attention()).backward()

    with flop_counter() as counter:
        Step().update()
    meter = PhaseMeter(count_step=0)
    meter.wrap(Step, "attention", "old_logprobs", within="update")
    meter.wrap(Step, "update", "update", ends_step=True)
    Step().attention()  # outside the update: not booked
    Step().update()
    flops = meter.steps[0]["flops"]
    assert flops["old_logprobs"] == 2 * (2 * 2 * 3 * 5 * 5 * 4)  # Q·Kᵀ and P·V of the forward, in the inner phase
    assert flops["update"] + flops["old_logprobs"] == counter.get_total_flops()  # the backward stays in the update
    assert {"4x8x16/bT", "4x16x8/bT"} <= set(meter.mm_shapes["update"])  # nn.Linear: x @ Wᵀ, Wᵀ a transposed view


def test_step_roofline_runs_every_side(tmp_path):
    """A small step (4 prompts × 2 answers, ≤ 8 new tokens): the time is mostly the three processes starting."""
    env = {**os.environ, "POLOPT_BENCH_RESULTS": str(tmp_path), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "step_roofline.py"), "--rounds", "1", "--steps", "2",
         "--prompts", "4", "--answers", "2", "--new-tokens", "8", "--name", "roofline"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "roofline.json").read_text())
    assert set(result["sides"]) == {"polopt", "polopt packed", "trl"}
    for side in result["sides"].values():
        assert side["flops"]["rollout"] > 0 and side["flops"]["update"] > side["flops"]["rollout"]
        assert all(side["cpu_seconds"][phase] > 0 for phase in ("rollout", "update", "optimizer"))
        # One optimiser step per rollout: neither side recomputes π_old.
        assert side["cpu_seconds"]["old_logprobs"] == 0 and side["flops"]["old_logprobs"] == 0
        assert side["categories"]["update"]["matrix products"][1] > 0.5 * side["flops"]["update"]
    assert len(result["matmul"]["gflops_by_shape"]) > 1  # the step's own shapes, and the square one
    # The same step on both sides: the same number of answers, about the same length.
    tokens = [side["answer_tokens_counted"] for side in result["sides"].values()]
    assert min(tokens) > 0 and max(tokens) <= 4 * 2 * 8
    for bound in result["bounds"].values():
        assert bound["least_cpu_seconds"] < bound["measured_cpu_seconds"]  # nothing runs above the peak
    text = (tmp_path / "roofline.md").read_text()
    assert "| trl | **step** |" in text and "| polopt | update | matrix products |" in text
