"""The token-level losses' options (issue 16): ratio_level, max_log_ratio, correct_rate_clip,
constant_normalizer. Each identity that holds at the defaults still holds under the options where
theory says so, the clamps are inactive where they should be, and NFT with the authors' options
equals an independent reference written from the issue's description of their code.

On-policy NFT ≡ GRPO family at every ratio level is test_losses_identities.py's identity 1 test.
Value-and-gradient agreement with the written-out equations under every option, exact
micro-batching, padding, groups without signal and finite extremes are checked by the shared tests
(test_losses_identities.py, test_losses_numerics.py, test_losses_token_weights.py), whose
`loss_configs` draw these options half of the time.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from strategies import (
    TOKEN_LEVEL_LOSSES,
    epsilons_at_most_one,
    loss_aggs,
    policy_batches,
    prompt_weights,
    token_level_options,
)

from polopt.losses import get_loss, global_normalizer
from polopt.losses.ratios import RATIO_LEVELS, policy_log_ratio
from polopt.testing.references import TIGHT, authors_nft_loss, loss_and_grad

@given(policy_batches(), st.sampled_from(["nft", "rft"]), st.data())
def test_nft_without_negatives_is_rft_and_zero_at_the_old_policy_under_every_option(batch, name, data):
    options = data.draw(token_level_options("nft"))
    loss_agg = data.draw(loss_aggs)
    nft = get_loss("nft", prompt_weight="constant", neg_weight=0.0, loss_agg=loss_agg, **options)
    rft_options = {k: v for k, v in options.items() if k != "correct_rate_clip"}  # RFT has no r̂
    rft = get_loss("rft", loss_agg=loss_agg, **rft_options)
    nft_loss, nft_grad = loss_and_grad(nft, batch)
    rft_loss, rft_grad = loss_and_grad(rft, batch)
    torch.testing.assert_close(nft_loss, rft_loss, **TIGHT)
    torch.testing.assert_close(nft_grad, rft_grad, **TIGHT)
    epsilon = data.draw(epsilons_at_most_one)
    with_negatives = get_loss("nft", epsilon=epsilon, prompt_weight=data.draw(prompt_weights), **options)
    assert loss_and_grad(with_negatives, batch.on_policy())[0].item() == 0.0


@given(policy_batches(max_log_ratio_scale=3.0), st.sampled_from(TOKEN_LEVEL_LOSSES), st.sampled_from(RATIO_LEVELS))
def test_the_authors_clamps_are_inactive_inside_their_range(batch, name, level):
    """max_log_ratio = 10 changes nothing when every log-ratio (at the level used) is below 10, and
    correct_rate_clip = [0.02, 0.98] nothing when every r̂ is inside it (groups of ≤ 16 answers)."""
    level_log_ratio = policy_log_ratio(
        torch.where(batch.mask, batch.logprobs - batch.old_logprobs, 0.0), batch.mask, batch.lengths, level
    )
    assume(bool((level_log_ratio < 10).all()))
    plain = get_loss(name, ratio_level=level)
    clamped = dict(ratio_level=level, max_log_ratio=10.0)
    if name == "nft":
        clamped["correct_rate_clip"] = [0.02, 0.98]
    plain_loss, plain_grad = loss_and_grad(plain, batch)
    loss, grad = loss_and_grad(get_loss(name, **clamped), batch)
    assert torch.equal(loss, plain_loss) and torch.equal(grad, plain_grad)


AUTHORS_OPTIONS = dict(epsilon=1.0, prompt_weight="dr_grpo", max_log_ratio=10.0, correct_rate_clip=[0.02, 0.98], constant_normalizer=1000)


@given(
    st.one_of(
        policy_batches(max_log_ratio_scale=8.0),  # token log-ratios often beyond 10
        policy_batches(max_groups=2, min_group_size=51, max_group_size=64, max_len=3, max_log_ratio_scale=8.0),  # r̂ < 0.02 or > 0.98 possible
    ),
    st.booleans(),
)
def test_nft_with_the_authors_options_equals_their_conventions(batch, sequence):
    """nft(max_log_ratio=10, correct_rate_clip=[0.02, 0.98], constant_normalizer=1000) with
    token-sum (token mode), or sequence_sum with seq-mean-token-mean (one term per answer: the
    authors' sequence mode), equals the reference of the issue's description in value and gradient."""
    options = dict(ratio_level="sequence_sum", loss_agg="seq-mean-token-mean") if sequence else dict(loss_agg="token-sum")
    loss, grad = loss_and_grad(get_loss("nft", **AUTHORS_OPTIONS, **options), batch)
    logprobs = batch.leaf()
    expected = authors_nft_loss(logprobs, batch, sequence=sequence)
    (expected_grad,) = torch.autograd.grad(expected, logprobs, allow_unused=True)
    torch.testing.assert_close(loss, expected.detach(), **TIGHT)
    torch.testing.assert_close(grad, torch.zeros_like(grad) if expected_grad is None else expected_grad, **TIGHT)


def test_max_log_ratio_is_a_plain_clamp():
    """A wrong answer's token at log-ratio 12 (r̂ = 2/3, ω = 1/3): with the clamp at 10 its gradient
    is 0 (without it, ω·r̂/(1 − r̂)·R/ε = ⅔·e^12 ≈ 1e5); a right answer's token above 10 gets 0 too,
    one below keeps −ω."""
    logprobs = torch.tensor([[12.0], [12.0], [1.0]], dtype=torch.float64) - 20
    old_logprobs = torch.full((3, 1), -20.0, dtype=torch.float64)
    args = (old_logprobs, torch.ones(3, 1, dtype=torch.bool), torch.tensor([0.0, 1.0, 1.0]), torch.tensor([0, 0, 0]))
    for max_log_ratio, expected in [(None, [2 / 3 * torch.e**12, -1 / 3, -1 / 3]), (10.0, [0.0, 0.0, -1 / 3])]:
        leaf = logprobs.clone().requires_grad_(True)
        nft = get_loss("nft", loss_agg="token-sum", max_log_ratio=max_log_ratio)
        nft(leaf, *args).loss.backward()
        torch.testing.assert_close(leaf.grad.flatten(), torch.tensor(expected, dtype=torch.float64), rtol=1e-9, atol=0)


def test_constant_normalizer_is_the_denominator_of_every_part():
    logprobs = torch.randn(4, 3, dtype=torch.float64)
    args = (logprobs, logprobs + 0.3, torch.ones(4, 3, dtype=torch.bool), torch.tensor([1.0, 0.0, 1.0, 0.0]), torch.tensor([0, 0, 1, 1]))
    summed = get_loss("dapo", loss_agg="token-sum")(*args).loss
    for loss_agg in ("token-sum", "token-mean", "seq-mean-token-sum"):
        loss_fn = get_loss("dapo", loss_agg=loss_agg, constant_normalizer=1000)
        assert loss_fn.normalizer_kind == "none"
        assert global_normalizer(loss_fn, args[2]) == 1000.0
        assert loss_fn(*args).loss.item() == pytest.approx(summed.item() / 1000, rel=1e-12)


@pytest.mark.parametrize(
    "name, hparams, message",
    [
        ("nft", dict(ratio_level="sequence"), r"ratio_level must be one of \('token', 'sequence_sum', 'sequence_mean'\), got 'sequence'"),
        ("grpo", dict(max_log_ratio=0), r"max_log_ratio must be > 0, got 0"),
        ("rft", dict(max_log_ratio="ten"), r"max_log_ratio must be a number > 0, got 'ten'"),
        ("nft", dict(correct_rate_clip=[0.98, 0.02]), r"correct_rate_clip must be \[low, high\] with 0 <= low < high <= 1, got \[0\.98, 0\.02\]"),
        ("nft", dict(correct_rate_clip=0.02), r"correct_rate_clip must be None or \[low, high\], got 0\.02"),
        ("dapo", dict(constant_normalizer=0), r"constant_normalizer must be None or a finite number > 0, got 0"),
        ("dr_grpo", dict(constant_normalizer="big"), r"constant_normalizer must be None or a number > 0, got 'big'"),
    ],
)
def test_bad_options_fail_at_construction(name, hparams, message):
    with pytest.raises(ValueError, match=message):
        get_loss(name, **hparams)


def test_correct_rate_clip_is_nfts_only():
    with pytest.raises(TypeError, match=r"unknown hyperparameter\(s\) \['correct_rate_clip'\]"):
        get_loss("grpo", correct_rate_clip=[0.02, 0.98])
