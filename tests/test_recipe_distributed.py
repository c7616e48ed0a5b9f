"""2 ranks (FSDP2 on gloo) give the loss and gradient norm of 1 rank on the same batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from polopt.batch import RolloutBatch

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "tests" / "scripts" / "update_on_fixed_batch.py"


def fixed_batch(num_groups: int = 8, group_size: int = 4, prompt_len: int = 12, response_len: int = 10) -> RolloutBatch:
    """Random tokens with ragged lengths, mixed rewards per group, off-policy old log-probs."""
    g = torch.Generator().manual_seed(0)
    B = num_groups * group_size
    input_ids = torch.randint(3, 300, (B, prompt_len + response_len), generator=g)
    lengths = torch.randint(2, response_len + 1, (B,), generator=g)
    response_mask = torch.arange(response_len)[None, :] < lengths[:, None]
    attention_mask = torch.cat([torch.ones(B, prompt_len, dtype=torch.bool), response_mask], dim=1)
    rewards = torch.tensor([float((i // group_size + i) % 3 == 0) for i in range(B)])
    group_ids = torch.arange(B) // group_size
    correct_rate = torch.stack([rewards[group_ids == gid].mean() for gid in group_ids])
    old_logprobs = (-torch.rand(B, response_len, generator=g) * 6 - 0.5) * response_mask
    return RolloutBatch(
        input_ids=input_ids, attention_mask=attention_mask, response_mask=response_mask,
        old_logprobs=old_logprobs, rewards=rewards, group_ids=group_ids, correct_rate=correct_rate,
        truncated=torch.zeros(B, dtype=torch.bool), prompt_len=prompt_len,
    )


def run_update(nproc: int, batch_path: Path, out: Path, loss: str) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(SCRIPT), str(batch_path), str(out), f"loss={loss}", f"output_dir={out.parent / 'run'}",
           "num_minibatches=2", "gradient_accumulation_steps=2", "validation.source=null"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return json.loads(out.read_text())


@pytest.mark.distributed
@pytest.mark.parametrize("loss", ["nft", "grpo"])
def test_two_ranks_match_one_rank(tmp_path, loss):
    batch_path = tmp_path / "batch.pt"
    torch.save(fixed_batch(), batch_path)
    one = run_update(1, batch_path, tmp_path / "one" / "m.json", loss)
    two = run_update(2, batch_path, tmp_path / "two" / "m.json", loss)
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-5, abs=1e-7)
    assert two["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-5)
    assert one["grad_norm"] > 0
