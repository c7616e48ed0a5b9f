"""The conformance kit on TRL's own GRPOTrainer loss code (issue 17; the TRL part of
docs/conformance_report.md, made by benchmarks/conformance_report.py).

Verdicts that must hold and verdicts that must not, so that a change in TRL or in the kit shows up:
- `loss_type="dr_grpo"`, `scale_rewards="none"` is polopt's Dr.GRPO exactly: every identity holds,
  `on_policy_equals_nft` with ω = 1 − r̂ included (paper Prop. 4.2 / Remark A.3).
- `loss_type="grpo"`, `scale_rewards="group"` (TRL's std) breaks Prop. 4.2: TRL divides by the unbiased
  std + 1e-4, so its on-policy gradient is not NFT's with ω = grpo; the structural identities hold.
- `loss_type="cispo"` is another objective off-policy (its value differs), yet on-policy its gradient is
  the GRPO family's.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")
from polopt.integrations.trl import TRLLossFunction  # noqa: E402
from polopt.losses import get_loss  # noqa: E402
from polopt.testing import check_policy_loss  # noqa: E402
from polopt.testing.conformance import batch_from_counterexample  # noqa: E402
from polopt.testing.references import loss_and_grad  # noqa: E402

EXAMPLES = 8  # per identity; the std convention is found on the first mixed group
FLOAT32 = dict(rtol=1e-4, atol=1e-6)  # TRL computes advantages in float32 (docs/conformance.md's float32 tolerance)
CLIP = dict(clip_low=0.2, clip_high=0.2)  # TRL's epsilon=0.2 on both sides
STRUCTURAL = ["no_signal_groups_contribute_zero", "padding_invariance", "finite_at_extreme_log_ratios", "row_order_invariance"]


def trl_check(kind: str, hparams: dict, **config):
    return check_policy_loss(
        TRLLossFunction(**config), kind, max_examples=EXAMPLES, equal_group_sizes=True, **FLOAT32, **CLIP, **hparams
    )


def test_trl_dr_grpo_without_std_is_polopt_dr_grpo():
    report = trl_check("dr_grpo", dict(max_response_len=10), loss_type="dr_grpo", scale_rewards="none", max_completion_length=10)
    assert report.ok, str(report)
    assert {"agreement", "on_policy_equals_nft", "gradient_matches_analytic_form"} <= set(report.checks_run)


def test_trl_grpo_with_group_std_breaks_the_on_policy_identity():
    report = trl_check("grpo", dict(loss_agg="seq-mean-token-mean"), loss_type="grpo", scale_rewards="group")
    assert {"agreement", "on_policy_equals_nft"} <= set(report.failed_identities), str(report)
    assert not set(STRUCTURAL + ["zero_gradient_outside_clip"]) & set(report.failed_identities), str(report)
    # The shrunk counter-example is one mixed group; there the ratio of the gradients is TRL's std convention.
    example = next(f for f in report.failures if f.identity == "on_policy_equals_nft").counterexample
    batch = batch_from_counterexample(example).on_policy()
    assert len(set(batch.group_ids.tolist())) == 1 and 0 < batch.rewards.mean() < 1
    _, trl_grad = loss_and_grad(TRLLossFunction(loss_type="grpo", scale_rewards="group"), batch)
    _, polopt_grad = loss_and_grad(get_loss("grpo", loss_agg="seq-mean-token-mean"), batch)
    size, rate = len(batch.rewards), batch.rewards.mean().item()
    population_std = (rate * (1 - rate)) ** 0.5
    unbiased_std = population_std * (size / (size - 1)) ** 0.5
    tokens = batch.mask & (polopt_grad != 0)
    ratio = trl_grad[tokens] / polopt_grad[tokens]
    torch.testing.assert_close(ratio, torch.full_like(ratio, population_std / (unbiased_std + 1e-4)), rtol=1e-5, atol=0)


def test_trl_cispo_differs_off_policy_but_not_on_policy():
    report = trl_check(
        "dr_grpo", dict(loss_agg="token-mean"), loss_type="cispo", scale_rewards="none", epsilon_high=5.0
    )
    assert "agreement" in report.failed_identities, str(report)
    assert "on_policy_equals_nft" in report.checks_run and "on_policy_equals_nft" not in report.failed_identities, str(report)
    assert not set(STRUCTURAL) & set(report.failed_identities), str(report)


def test_trl_adapter_refuses_groups_of_different_sizes():
    fn = TRLLossFunction(loss_type="dr_grpo", scale_rewards="none")
    logprobs = torch.zeros(3, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"groups of one size .*\[2, 1\]"):
        fn(logprobs, logprobs, torch.ones(3, 2, dtype=torch.bool), torch.tensor([1.0, 0.0, 1.0]), torch.tensor([0, 0, 1]))


def test_readme_headline_table_is_the_reports():
    """README.md's table is copied from docs/conformance_report.md: every row must be the report's."""
    repo = Path(__file__).resolve().parents[1]
    report = (repo / "docs" / "conformance_report.md").read_text()
    readme = (repo / "README.md").read_text()
    section = readme.split("### The peers' losses against the identities")[1].split("\n## ")[0]
    rows = [line for line in section.splitlines() if line.startswith("| ")]
    assert len(rows) >= 5
    assert all(row in report.splitlines() for row in rows)
