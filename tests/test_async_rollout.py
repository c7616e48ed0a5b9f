"""Rollout behind a producer boundary (polopt/rollout_worker.py): the synchronous recipe through it
is the recorded pre-boundary run bit for bit, stale rollouts have exactly the staleness asked for,
and a run with stale rollouts in flight resumes to the metrics of an uninterrupted one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from test_recipe import REPO, history, run_in_process, tune_run, tune_run_killed_after_checkpoint
from test_recipe_distributed import step_metrics

RECORDED = REPO / "tests" / "data" / "sync_run_history_tiny.json"
# The overrides the recorded run used (with SMALL); recorded on the commit before the producer
# boundary, with the losses' current clip-fraction counting.
RECORDED_RUN = ["max_steps=3", "num_threads=1", "save_final_model=false", "checkpoint_every_n_steps=null"]
STALE = ["validation.source=null", "save_final_model=false", "checkpoint_every_n_steps=2", "num_threads=1",
         "recompute_old_logprobs=true", "rollout_correction.enabled=true", "rollout.num_prompts=8", "rollout.num_samples=4", "filter.gen_batch_size=8",
         "filter.max_gen_batches=2", "num_minibatches=2", "max_steps=4"]


def without_times(entries: list[dict]) -> list[dict]:
    return [{k: v for k, v in e.items() if not k.startswith("time/") and k != "tokens_per_second"} for e in entries]


def test_synchronous_recipe_through_the_producer_is_the_recorded_run(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    run_in_process(tmp_path / "run", *RECORDED_RUN)
    assert without_times(history(tmp_path / "run")) == json.loads(RECORDED.read_text())


@pytest.mark.slow
def test_stale_rollouts_resume_to_the_metrics_of_an_uninterrupted_run(tmp_path):
    """max_staleness=2: steps 0, 1, 2, 3 train on rollouts of policy versions 0, 0, 0, 1 (staleness
    0, 1, 2, 2); killed after the step-2 checkpoint (the rollouts of steps 2 and 3 in flight, recorded
    there), resumed: every per-step metric equals the uninterrupted run's."""
    full, killed = tmp_path / "full", tmp_path / "killed"
    overrides = [*STALE, "rollout.max_staleness=2"]
    tune_run(full, *overrides)
    staleness = [h["rollout/staleness"] for h in history(full) if h["step"] > 0]
    assert staleness == [0.0, 1.0, 2.0, 2.0]
    assert all(h["rollout_correction/logprob_abs_diff_mean"] > 0 for h in history(full) if h["step"] > 2)
    tune_run_killed_after_checkpoint(2, killed, *overrides)
    saved = json.loads((killed / "checkpoints" / "step_2" / "rank_0.json").read_text())
    assert [r["step"] for r in saved["in_flight"]] == [2, 3]
    tune_run(killed, *overrides, "resume=true")
    assert step_metrics(killed) == step_metrics(full)


@pytest.mark.distributed
def test_stale_rollouts_on_two_ranks(tmp_path):
    """--nproc_per_node 2, max_staleness=1: a producer process per rank, each its own data shard."""
    tune_run(tmp_path, *STALE, "rollout.max_staleness=1", "max_steps=3", "checkpoint_every_n_steps=null",
             "num_threads=1", nproc=2)
    steps = [h for h in history(tmp_path) if h["step"] > 0]
    assert [h["rollout/staleness"] for h in steps] == [0.0, 1.0, 1.0]
    assert json.loads((Path(tmp_path) / "summary.json").read_text())["world_size"] == 2
