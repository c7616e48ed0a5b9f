"""2 ranks (FSDP2 on gloo) take the optimiser steps of 1 rank on the same batch; a killed
2-rank run resumes from its sharded checkpoint to the same metrics; unusable checkpoints are refused."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from polopt.batch import RolloutBatch
from test_checkpoint import RunsCode
from test_recipe import history, tune_run, tune_run_killed_after_checkpoint

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
        old_logprobs=old_logprobs, rewards=rewards, group_ids=group_ids, correct_rate=correct_rate, prompt_len=prompt_len,
    )


def run_update(nproc: int, batch_path: Path, out: Path, loss: str) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(SCRIPT), str(batch_path), str(out), f"loss={loss}", f"output_dir={out.parent / 'run'}",
           "num_minibatches=4", "gradient_accumulation_steps=2", "validation.source=null"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return json.loads(out.read_text())


@pytest.mark.distributed
@pytest.mark.parametrize("loss", ["nft", "grpo", "infonca"])
def test_two_ranks_take_the_optimiser_steps_of_one_rank(tmp_path, loss):
    """6 groups, num_minibatches=4: each rank holds 3 groups, yet both runs take 4 optimiser steps
    over the same mini-batches (partial groups and placeholder micro-batches on 2 ranks; InfoNCA,
    which needs whole groups in one call, gets whole groups dealt)."""
    batch_path = tmp_path / "batch.pt"
    torch.save(fixed_batch(num_groups=6), batch_path)
    one = run_update(1, batch_path, tmp_path / "one" / "m.json", loss)
    two = run_update(2, batch_path, tmp_path / "two" / "m.json", loss)
    assert one["optimizer_steps"] == two["optimizer_steps"] == 4
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-5, abs=1e-7)
    assert two["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-5)
    assert one["grad_norm"] > 0
    assert min(one["update_norms"].values()) > 0
    assert two["update_norms"] == pytest.approx(one["update_norms"], rel=1e-4, abs=1e-9)


# ---------------------------------------------------------------------------------- resume
# Sharded checkpoints through `tune run` on 2 gloo ranks (polopt/checkpoint/).
RESUME = ["validation.source=null", "save_final_model=false", "checkpoint_every_n_steps=2"]


def step_metrics(output_dir: Path) -> dict[int, dict[str, float]]:
    """Every logged metric per training step, except wall-clock ones."""
    return {
        h["step"]: {k: v for k, v in h.items() if not k.startswith("time/") and k != "tokens_per_second"}
        for h in history(output_dir) if h["step"] > 0
    }


@pytest.mark.slow
@pytest.mark.distributed
def test_killed_two_rank_run_resumes_with_identical_rewards_and_losses(tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    tune_run(full, "max_steps=4", *RESUME, nproc=2)
    tune_run_killed_after_checkpoint(2, killed, "max_steps=4", *RESUME, nproc=2)
    assert not (killed / "history.json").exists(), "the run finished before it was killed"
    tune_run(killed, "max_steps=4", *RESUME, "resume=true", nproc=2)

    assert (killed / "checkpoints" / "step_4").is_dir(), "the resumed run wrote no checkpoint"
    assert sorted(p.name for p in (killed / "checkpoints" / "step_4").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    expected, resumed = step_metrics(full), step_metrics(killed)
    assert sorted(resumed) == [1, 2, 3, 4]
    assert all("loss" in m and "reward/mean" in m for m in expected.values())
    assert resumed == expected


@pytest.fixture(scope="module")
def one_rank_checkpoint(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one_rank") / "run"
    tune_run(out, "max_steps=1", "validation.source=null", "save_final_model=false", "checkpoint_every_n_steps=1")
    assert (out / "checkpoints" / "step_1").is_dir()
    return out


def error_lines(proc) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


@pytest.mark.slow
@pytest.mark.distributed
def test_one_rank_checkpoint_is_refused_on_two_ranks(one_rank_checkpoint, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(one_rank_checkpoint, out)
    proc = tune_run(out, "max_steps=2", *RESUME, "resume=true", nproc=2, check=False)
    assert proc.returncode != 0
    assert error_lines(proc), proc.stderr[-3000:]
    assert "written by 1 rank(s) and this run has 2" in error_lines(proc)[0]
    assert "--nproc_per_node 1" in error_lines(proc)[0]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_1"]


@pytest.mark.slow
def test_planted_pickle_in_a_checkpoint_is_refused_by_the_recipe(one_rank_checkpoint, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(one_rank_checkpoint, out)
    marker = tmp_path / "ran"
    (out / "checkpoints" / "step_1" / ".metadata").write_bytes(pickle.dumps(RunsCode(marker)))
    proc = tune_run(out, "max_steps=2", *RESUME, "resume=true", check=False)
    assert proc.returncode == 2
    assert len(error_lines(proc)) == 1 and "refusing to resume" in error_lines(proc)[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert not marker.exists()
