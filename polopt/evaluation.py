"""avg@k and pass@k of a policy on question/answer sets, through the training rollout engines and
verifier, so that validation during training and `recipes/evaluate.py` measure the same thing.

    avg@n  = mean over questions of (correct answers among n samples) / n
    pass@n = fraction of questions with at least one correct answer among n samples
    pass@k = mean over questions of 1 - C(n - c, k) / C(n, k), for k <= n   (`pass_at_k`)

The last is the unbiased estimator of Chen et al. 2021 ("Evaluating Large Language Models Trained
on Code", Eq. 1): with c of a question's n samples correct, it is the probability that a k-subset
drawn without replacement from the n holds at least one correct answer. pass@1 = avg@n and
pass@n = the fraction of questions solved at least once. (`evaluate_prompts`' `k` is the number of
samples n; its "avg_at_k"/"pass_at_k" are avg@n and pass@n.)
"""

from __future__ import annotations

import math
from dataclasses import replace
from fractions import Fraction
from typing import Callable, Sequence

from tqdm import tqdm

from polopt.prompts import Prompt
from polopt.rollout import RolloutEngine, SamplingParams
from polopt.rollout.sampler import generate_and_verify
from polopt.seeds import call_seed
from polopt.verify import verification_counts


def pass_at_k(correct_counts: Sequence[int], n: int, k: int) -> float:
    """Unbiased pass@k averaged over questions: mean of 1 - C(n - c, k) / C(n, k) over the
    per-question correct counts c (each 0 <= c <= n) of n samples per question, 1 <= k <= n.
    Exact (integer binomials), so pass@n is exactly the solved fraction."""
    if not 1 <= k <= n:
        raise ValueError(f"pass@k needs 1 <= k <= n (samples per question), got k={k}, n={n}")
    if not correct_counts:
        return 0.0
    total = Fraction(0)
    for c in correct_counts:
        if not 0 <= c <= n:
            raise ValueError(f"a question's correct count must be in [0, n={n}], got {c}")
        total += 1 - Fraction(math.comb(n - int(c), k), math.comb(n, k))
    return float(total / len(correct_counts))


DEFAULT_BATCH_SIZE = 64  # prompts per engine call: the recipes' `validation.batch_size` / `batch_size` default


def evaluate_prompts(
    engine: RolloutEngine,
    verifier: Callable[[list[str], list[str]], list[float]],
    prompts: Sequence[Prompt],
    *,
    k: int,
    params: SamplingParams,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool = False,
    desc: str = "eval",
    keep_answers: bool = False,
) -> dict[str, float]:
    """Sample `k` answers for each `Prompt`, verify, and score (as training does: `generate_and_verify`).

    Truncated answers count as wrong. Returns sums as well as means so that callers sharding
    questions across ranks can add them up: {"correct", "solved", "n_questions", "k",
    "avg_at_k", "pass_at_k", "mean_response_len", "truncation_rate"}, plus the verifier's counts
    over this call when it keeps them (`verify/timeouts`, `verify/worker_deaths`,
    `verify/filtered_as_code`, `verify/answers`: see `polopt.verify.verification_counts`), and
    "correct_per_question" (a list, the correct count of each question in order: the input of
    `pass_at_k`). With `keep_answers`, also "answers": one dict per sampled answer (question, gold,
    answer text, reward, truncated), questions in order.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    correct = solved = tokens = truncated = 0.0
    per_question: list[int] = []
    answers: list[dict] = []
    counts_before = verification_counts(verifier)
    bar = tqdm(total=len(prompts), desc=desc, disable=not progress, leave=False)
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        seed = call_seed(params.seed, start)
        groups = generate_and_verify(engine, verifier, chunk, k, replace(params, seed=seed))
        flat = [c for g in groups for c in g.completions]
        for g in groups:
            correct += sum(g.rewards)
            solved += float(max(g.rewards) > 0)
            per_question.append(int(sum(r > 0 for r in g.rewards)))
        if keep_answers:
            answers += [{"question": p.text, "gold": p.answer, "answer": c.text, "reward": r, "truncated": c.truncated}
                        for p, g in zip(chunk, groups) for c, r in zip(g.completions, g.rewards)]
        tokens += sum(len(c.token_ids) for c in flat)
        truncated += sum(c.truncated for c in flat)
        bar.update(len(chunk))
    bar.close()
    n = len(prompts)
    samples = max(1, n * k)
    return {
        "correct": correct,
        "solved": solved,
        "n_questions": float(n),
        "k": float(k),
        "avg_at_k": correct / samples if n else 0.0,
        "pass_at_k": solved / n if n else 0.0,
        "mean_response_len": tokens / samples,
        "truncation_rate": truncated / samples,
        **verification_counts(verifier, counts_before),
        "correct_per_question": per_question,
        **({"answers": answers} if keep_answers else {}),
    }


def merge_counts(parts: list[dict[str, float]]) -> dict[str, float]:
    """Combine `evaluate_prompts` results of disjoint question shards (e.g. one per rank)."""
    n = sum(p["n_questions"] for p in parts)
    k = parts[0]["k"] if parts else 1.0
    samples = max(1.0, n * k)
    return {
        "correct": sum(p["correct"] for p in parts),
        "solved": sum(p["solved"] for p in parts),
        "n_questions": n,
        "k": k,
        "avg_at_k": sum(p["correct"] for p in parts) / samples,
        "pass_at_k": sum(p["solved"] for p in parts) / max(1.0, n),
        "mean_response_len": sum(p["mean_response_len"] * p["n_questions"] * k for p in parts) / samples,
        "truncation_rate": sum(p["truncation_rate"] * p["n_questions"] * k for p in parts) / samples,
        **{name: sum(p[name] for p in parts) for name in (parts[0] if parts else {}) if name.startswith("verify/")},
        "correct_per_question": [c for p in parts for c in p.get("correct_per_question", [])],
    }
