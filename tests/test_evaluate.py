"""recipes/evaluate.py through `tune run`: the tiny model on its arithmetic set and MATH500."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TUNE = str(Path(sys.executable).parent / "tune")
MATH500 = REPO.parent / "shared" / "data" / "math500.jsonl"


def evaluate(*overrides: str) -> subprocess.CompletedProcess:
    cmd = [TUNE, "run", "recipes/evaluate.py", "--config", "configs/evaluate.yaml", *overrides]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)


@pytest.mark.slow
@pytest.mark.skipif(not MATH500.exists(), reason="../shared/data is not beside the checkout")
def test_evaluate_writes_avg_and_pass_at_k_per_dataset(tmp_path):
    datasets = (
        "datasets=[{source: assets/tiny_arith/val.jsonl, name: arith, max_questions: 24},"
        f"{{source: {MATH500}, name: math500, template: qwen_boxed, max_questions: 6}}]"
    )
    proc = evaluate(f"output_dir={tmp_path}", datasets, "k=3")
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads((tmp_path / "eval.json").read_text())["datasets"]
    assert set(results) == {"arith", "math500"}
    arith = results["arith"]
    assert arith["k"] == 3 and arith["n_questions"] == 24
    assert 0 <= arith["avg_at_k"] <= arith["pass_at_k"] <= 1
    # The base tiny model solves some arithmetic (its base pass@1 is ~0.3), so the path is live.
    assert arith["correct"] > 0
    # the verifier's counts reach eval.json, so a failing verifier is not mistaken for a failing model
    assert arith["verify/answers"] == 24 * 3 and arith["verify/timeouts"] == 0 and arith["verify/worker_deaths"] == 0
    assert results["math500"]["n_questions"] == 6
    assert results["math500"]["sampling"]["max_new_tokens"] == 64
    table = (tmp_path / "eval.md").read_text()
    assert "| arith | 24 | 3 |" in table and "math500" in table


@pytest.mark.slow
def test_evaluate_bad_input_names_the_problem(tmp_path):
    proc = evaluate(f"output_dir={tmp_path}", "datasets=[/no/such/set.jsonl]")
    assert proc.returncode == 2 and "/no/such/set.jsonl" in proc.stderr

    proc = evaluate(f"output_dir={tmp_path}", "k=0")
    assert proc.returncode == 2 and "'k' must be >= 1" in proc.stderr

    proc = evaluate(f"output_dir={tmp_path}", "datasets=[{source: assets/tiny_arith/val.jsonl, answer_field: solution}]")
    assert proc.returncode == 2 and "solution" in proc.stderr and "val.jsonl" in proc.stderr
