"""recipes/evaluate.py through `tune run`: the tiny model on its arithmetic set and MATH500; and
`polopt.evaluation.pass_at_k`, the unbiased pass@k estimator, against brute-force enumeration."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from polopt.evaluation import pass_at_k

REPO = Path(__file__).resolve().parent.parent
TUNE = str(Path(sys.executable).parent / "tune")
MATH500 = REPO / "assets" / "data" / "math500.jsonl"


@st.composite
def sample_outcomes(draw, max_n: int = 8) -> tuple[int, list[list[bool]]]:
    """n samples per question and each sample's verdict, for 1-6 questions."""
    n = draw(st.integers(1, max_n))
    questions = draw(st.lists(st.lists(st.booleans(), min_size=n, max_size=n), min_size=1, max_size=6))
    return n, questions


def brute_force_pass_at_k(questions: list[list[bool]], k: int) -> Fraction:
    """The definition: over every k-subset of each question's samples, the share holding a correct one."""
    per_question = []
    for outcomes in questions:
        subsets = list(itertools.combinations(outcomes, k))
        per_question.append(Fraction(sum(any(s) for s in subsets), len(subsets)))
    return sum(per_question) / len(per_question)


@given(sample_outcomes(), st.data())
def test_pass_at_k_equals_enumeration_over_all_k_subsets(drawn, data):
    n, questions = drawn
    k = data.draw(st.integers(1, n))
    counts = [sum(q) for q in questions]
    assert pass_at_k(counts, n, k) == pytest.approx(float(brute_force_pass_at_k(questions, k)), abs=1e-12)


@given(sample_outcomes())
def test_pass_at_n_is_the_solved_fraction_and_pass_at_1_is_avg_at_n(drawn):
    n, questions = drawn
    counts = [sum(q) for q in questions]
    assert pass_at_k(counts, n, n) == sum(c > 0 for c in counts) / len(counts)
    assert pass_at_k(counts, n, 1) == pytest.approx(sum(counts) / (n * len(counts)), abs=1e-12)
    # more draws can only help
    values = [pass_at_k(counts, n, k) for k in range(1, n + 1)]
    assert all(a <= b + 1e-12 for a, b in zip(values, values[1:]))


def test_pass_at_k_refuses_k_outside_1_to_n_and_counts_above_n():
    for k in (0, 5):
        with pytest.raises(ValueError, match="1 <= k <= n"):
            pass_at_k([1, 2], 4, k)
    with pytest.raises(ValueError, match=r"\[0, n=4\]"):
        pass_at_k([5], 4, 2)
    assert pass_at_k([], 4, 2) == 0.0


def evaluate(*overrides: str) -> subprocess.CompletedProcess:
    cmd = [TUNE, "run", "recipes/evaluate.py", "--config", "configs/evaluate.yaml", *overrides]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)


@pytest.mark.slow
def test_evaluate_writes_avg_and_pass_at_k_per_dataset(tmp_path):
    datasets = (
        "datasets=[{source: assets/tiny_arith/val.jsonl, name: arith, max_questions: 24},"
        f"{{source: {MATH500}, name: math500, template: qwen_boxed, max_questions: 6}}]"
    )
    proc = evaluate(f"output_dir={tmp_path}", datasets, "k=3", "pass_k=[2,1,3]")
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads((tmp_path / "eval.json").read_text())["datasets"]
    assert set(results) == {"arith", "math500"}
    arith = results["arith"]
    assert arith["k"] == 3 and arith["n_questions"] == 24
    assert 0 <= arith["avg_at_k"] <= arith["pass_at_k"] <= 1
    # the unbiased pass@j come from the per-question counts: pass@1 = avg@k, pass@k = solved in k
    counts = arith["correct_per_question"]
    assert len(counts) == 24 and sum(counts) == arith["correct"]
    assert arith["pass@1"] == pytest.approx(arith["avg_at_k"]) and arith["pass@3"] == pytest.approx(arith["pass_at_k"])
    assert arith["pass@1"] <= arith["pass@2"] <= arith["pass@3"]
    # The base tiny model solves some arithmetic (its base pass@1 is ~0.3), so the path is live.
    assert arith["correct"] > 0
    # the verifier's counts reach eval.json, so a failing verifier is not mistaken for a failing model
    assert arith["verify/answers"] == 24 * 3 and arith["verify/timeouts"] == 0 and arith["verify/worker_deaths"] == 0
    assert results["math500"]["n_questions"] == 6
    assert results["math500"]["sampling"]["max_new_tokens"] == 64
    table = (tmp_path / "eval.md").read_text()
    assert "| arith | 24 | 3 |" in table and "math500" in table
    assert "pass@1 | pass@2 | pass@3 |" in table.splitlines()[0]


