"""The conformance kit: passes polopt's six losses, catches deliberately broken third-party losses,
and the example in docs/conformance.md runs.

The broken losses are written the way a third party would write them (plain torch, own group
statistics), each with one known bug; the kit must fail them on the identity that bug breaks.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

from polopt.losses import get_loss
from polopt.testing import KINDS, as_loss_function, check_policy_loss
from polopt.testing.conformance import batch_from_counterexample
from polopt.testing.references import loss_and_grad

EXAMPLES = 15  # per identity; a broken loss is found in the first few
DOCS = Path(__file__).resolve().parents[1] / "docs"


def group_stats(rewards, group_ids, unbiased=False):
    """Per-row mean and std of the row's group (plain third-party code)."""
    mean = torch.zeros_like(rewards)
    std = torch.zeros_like(rewards)
    for gid in group_ids.unique():
        rows = group_ids == gid
        mean[rows] = rewards[rows].mean()
        std[rows] = rewards[rows].std(unbiased=unbiased) if rows.sum() > 1 else 0.0
    return mean, std


def clipped_surrogate(logprobs, old_logprobs, mask, advantage, clip_low, clip_high):
    ratio = torch.exp(torch.where(mask, logprobs - old_logprobs, 0.0))
    a = advantage[:, None]
    return -torch.min(ratio * a, torch.clamp(ratio, 1 - clip_low, 1 + clip_high) * a)


def grpo_with_unbiased_std(logprobs, old_logprobs, mask, rewards, group_ids):
    """GRPO as many codebases write it: A = (r − mean)/std with the unbiased (K − 1) std."""
    mean, std = group_stats(rewards, group_ids, unbiased=True)
    advantage = torch.where(std > 0, (rewards - mean) / std.clamp(min=1e-12), 0.0)
    per_token = clipped_surrogate(logprobs, old_logprobs, mask, advantage, 0.2, 0.2)
    lengths = mask.sum(-1)
    return (torch.where(mask, per_token, 0.0).sum(-1) / lengths.clamp(min=1)).mean()


def nft_with_plain_clamp(logprobs, old_logprobs, mask, rewards, group_ids, epsilon=0.5):
    """NFT (ω = 1 − r̂, token-mean) with max(x, ε) as a plain clamp: no gradient where x < ε."""
    rate, _ = group_stats(rewards, group_ids)
    informative = (rate > 0) & (rate < 1)
    safe = torch.where(informative, rate, 0.5)[:, None]
    log_ratio = torch.where(mask, logprobs - old_logprobs, 0.0)
    negative_ratio = (1 - safe * torch.exp(log_ratio)) / (1 - safe)
    negative = -torch.log(torch.clamp(negative_ratio, min=epsilon))  # the bug: should be straight-through
    per_token = (1 - safe) * torch.where(rewards[:, None] == 1, -log_ratio, negative)
    per_token = torch.where(mask & informative[:, None], per_token, 0.0)
    return per_token.sum() / mask.sum().clamp(min=1)


def dapo_with_per_micro_batch_token_mean(logprobs, old_logprobs, mask, rewards, group_ids):
    """DAPO whose token mean is taken on each half of the batch, then averaged (as with gradient
    accumulation that divides by each micro-batch's own token count)."""
    mean, std = group_stats(rewards, group_ids)
    advantage = torch.where(std > 0, (rewards - mean) / std.clamp(min=1e-12), 0.0)
    per_token = torch.where(mask, clipped_surrogate(logprobs, old_logprobs, mask, advantage, 0.2, 0.28), 0.0)
    halves = [slice(0, (len(rewards) + 1) // 2), slice((len(rewards) + 1) // 2, None)]
    means = [per_token[h].sum() / mask[h].sum().clamp(min=1) for h in halves if mask[h].numel()]
    return torch.stack(means).mean()


@pytest.mark.parametrize("kind", KINDS)
def test_polopt_losses_pass(kind):
    report = check_policy_loss(as_loss_function(get_loss(kind)), kind, max_examples=EXAMPLES)
    assert report.ok, str(report)
    assert "agreement" in report.checks_run and len(report.checks_run) >= 6


def test_nondefault_hyperparameters_pass():
    hparams = dict(epsilon=0.6, prompt_weight="grpo", loss_agg="seq-mean-token-sum")
    report = check_policy_loss(as_loss_function(get_loss("nft", **hparams)), "nft", max_examples=EXAMPLES, **hparams)
    assert report.ok, str(report)
    assert "on_policy_equals_grpo_family" in report.checks_run


@pytest.mark.parametrize(
    ("fn", "kind", "hparams", "identity"),
    [
        (grpo_with_unbiased_std, "grpo", {}, "on_policy_equals_nft"),
        (nft_with_plain_clamp, "nft", dict(epsilon=0.5, loss_agg="token-mean"), "gradient_matches_analytic_form"),
        (dapo_with_per_micro_batch_token_mean, "dapo", {}, "row_order_invariance"),
    ],
    ids=["unbiased-std", "plain-clamp", "per-micro-batch-mean"],
)
def test_broken_losses_fail_on_the_identity_they_break(fn, kind, hparams, identity):
    report = check_policy_loss(fn, kind, max_examples=EXAMPLES, **hparams)
    assert not report.ok
    assert identity in report.failed_identities, str(report)
    failure = next(f for f in report.failures if f.identity == identity)
    assert failure.message and failure.counterexample
    assert identity in str(report) and "minimal counter-example" in str(report)


def test_counterexample_is_shrunk_and_reproduces_the_failure():
    """The reported example is small (hypothesis shrinking) and still breaks the identity."""
    report = check_policy_loss(grpo_with_unbiased_std, "grpo", max_examples=EXAMPLES)
    failure = next(f for f in report.failures if f.identity == "agreement")
    example = failure.counterexample
    assert len(example["rewards"]) <= 6  # drawn batches have up to 64 rows
    batch = batch_from_counterexample(example)
    loss, grad = loss_and_grad(grpo_with_unbiased_std, batch)
    polopt_loss, polopt_grad = loss_and_grad(get_loss("grpo"), batch)
    differs = not math.isclose(loss.item(), polopt_loss.item(), rel_tol=1e-6, abs_tol=1e-9)
    assert differs or not torch.allclose(grad, polopt_grad, rtol=1e-6, atol=1e-9)


def test_a_loss_that_raises_is_a_failure_not_a_crash():
    def raises(*args):
        raise RuntimeError("boom")

    report = check_policy_loss(raises, "rft", max_examples=2)
    assert set(report.failed_identities) == set(report.checks_run)
    assert "RuntimeError: boom" in report.failures[0].message


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: check_policy_loss(lambda *a: None, "ppo"), "kind must be one of"),
        (lambda: check_policy_loss(None, "nft"), "fn must be callable"),
        (lambda: check_policy_loss(lambda *a: None, "nft", max_examples=0), "max_examples must be"),
        (lambda: check_policy_loss(lambda *a: None, "nft", clip_low=0.2), "unknown hyperparameter"),
    ],
)
def test_bad_arguments_raise_naming_the_problem(call, message):
    with pytest.raises((ValueError, TypeError), match=message):
        call()


def python_blocks(markdown: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", markdown.read_text(), flags=re.S)


def test_docs_conformance_example_runs():
    """docs/conformance.md's example, executed as written (so the docs cannot drift)."""
    blocks = python_blocks(DOCS / "conformance.md")
    assert blocks
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(DOCS / "conformance.md"), "exec"), namespace)
    assert namespace["report"].ok


def dr_grpo_of_consecutive_groups(logprobs, old_logprobs, mask, rewards, group_ids, clip=0.2):
    """Dr.GRPO written as trainers with `num_generations` rows per prompt write it: sort rows by
    prompt, then `rewards.view(-1, K)` — which needs every group to have the same size K."""
    order = torch.sort(group_ids, stable=True).indices
    size = int((group_ids == group_ids[0]).sum())
    grouped = rewards[order].view(-1, size)
    advantage = torch.empty_like(rewards)
    advantage[order] = (grouped - grouped.mean(dim=1, keepdim=True)).flatten()
    per_token = clipped_surrogate(logprobs, old_logprobs, mask, advantage, clip, clip)
    return torch.where(mask, per_token, 0.0).sum() / mask.numel()


def test_equal_group_sizes_checks_code_that_needs_one_group_size():
    report = check_policy_loss(dr_grpo_of_consecutive_groups, "dr_grpo", max_examples=EXAMPLES, equal_group_sizes=True)
    assert report.ok, str(report)
    # Groups of different sizes, which the kit draws by default, break that code.
    logprobs = torch.zeros(5, 2, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="invalid for input of size 5"):
        dr_grpo_of_consecutive_groups(logprobs, logprobs, torch.ones(5, 2, dtype=torch.bool), torch.tensor([1.0, 0, 1, 0, 0]), torch.tensor([0, 0, 1, 1, 1]))


def test_a_nondeterministic_loss_is_reported_not_a_crash():
    calls = []

    def alternating(logprobs, old_logprobs, mask, rewards, group_ids):
        """polopt's RFT on every other call, twice it on the others."""
        calls.append(None)
        loss = get_loss("rft")(logprobs, old_logprobs, mask, rewards, group_ids).loss
        return loss * (1 + len(calls) % 2)

    report = check_policy_loss(alternating, "rft", max_examples=EXAMPLES)
    assert "agreement" in report.failed_identities, str(report)
