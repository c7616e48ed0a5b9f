"""Rollout correction in the loss contract: `token_weights=` [B, T] on every loss (base.py).

A token-level loss aggregates w_bt · ℓ_bt (denominators unchanged); InfoNCA weights each answer by
the mean of its tokens' weights, as an importance weight of that sample in its group (infonca.py).
Pinned here: weights of 1 are bit for bit no weights (every registered loss and a user's own), the
weighted loss and gradient equal the written-out reference, a weight of 0 removes a token's (or an
answer's) contribution, padding weights never matter, micro-batching stays exact, and a loss that
does not say what the weights mean refuses them.

Mutations tried by hand (each alone): InfoNCA's partition function without the weights — caught by
test_infonca_weighted_loss_equals_the_reference and test_infonca_integer_answer_weight_is_that_many_copies;
padding weights not zeroed — caught by test_padding_weights_never_matter and 7 others.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from strategies import PolicyBatch, loss_configs, policy_batches, splits, token_weights

from polopt.losses import TOKEN_LEVEL_LOSSES, PolicyLoss, TokenLevelLoss, get_loss
from polopt.losses import registry
from polopt.testing.references import TIGHT, analytic_gradient, loss_and_grad, reference_loss, split_loss_and_grad

TOKEN_LEVEL = TOKEN_LEVEL_LOSSES


class NegativeLogLikelihoodOfRightAnswers(TokenLevelLoss):
    """A user's loss with no code for weights: −log π_θ on right answers' tokens."""

    def __init__(self, loss_agg: str = "token-mean", kl_coef: float = 0.0) -> None:
        super().__init__(loss_agg, kl_coef=kl_coef)

    def token_losses(self, inputs):
        return torch.where(inputs.positive[:, None], -inputs.logprobs, 0.0), {}


class SequenceLossWithoutWeights(PolicyLoss):
    """A user's loss with its own compute() that does not declare what token weights mean."""

    def compute(self, inputs, normalizer):
        return (inputs.log_ratio.sum(dim=-1) * inputs.rewards).sum(), {}


@st.composite
def any_loss(draw):
    """A built-in loss from its valid hyperparameters, or the user's token-level loss above."""
    if draw(st.booleans()):
        name, hparams = draw(loss_configs())
        return get_loss(name, **hparams)
    return NegativeLogLikelihoodOfRightAnswers(loss_agg=draw(st.sampled_from(["token-mean", "seq-mean-token-sum"])))


def call(loss_fn, batch: PolicyBatch, **kwargs):
    logprobs = batch.leaf()
    out = loss_fn(logprobs, batch.old_logprobs, batch.mask, batch.rewards, batch.group_ids, **kwargs)
    (grad,) = torch.autograd.grad(out.loss, logprobs, allow_unused=True)
    return out, torch.zeros_like(logprobs) if grad is None else grad


@given(policy_batches(), any_loss())
def test_weights_of_one_equal_no_weights_bit_for_bit(batch, loss_fn):
    plain, plain_grad = call(loss_fn, batch)
    ones, ones_grad = call(loss_fn, batch, token_weights=torch.ones_like(batch.logprobs))
    assert torch.equal(ones.loss, plain.loss)
    assert torch.equal(ones_grad, plain_grad)
    assert ones.metrics.pop("token_weight_mean") == (1.0 if batch.mask.any() else 0.0)
    assert ones.metrics == plain.metrics


@given(policy_batches(), loss_configs(), st.data())
def test_weighted_loss_equals_the_reference(batch, config, data):
    """Token level: Σ_bt w_bt · a_bt · ℓ_bt; InfoNCA: answers weighted by their mean token weight."""
    name, hparams = config
    weights = data.draw(token_weights(batch))
    loss, grad = loss_and_grad(get_loss(name, **hparams), batch, token_weights=weights)
    assert math.isclose(loss.item(), reference_loss(name, hparams, batch, weights), rel_tol=1e-9, abs_tol=1e-12)
    if name in TOKEN_LEVEL:
        torch.testing.assert_close(grad, analytic_gradient(name, hparams, batch, weights), **TIGHT)


@given(policy_batches(), loss_configs(names=TOKEN_LEVEL), st.data())
def test_a_zero_weight_removes_a_tokens_contribution(batch, config, data):
    """Zero-weighted tokens get exactly zero gradient, and moving their log-probs changes nothing.
    (At a sequence ratio level a token's log-prob also enters its answer's ratio, which the other
    tokens' terms use: there the weight removes the token's own term only, as the reference says.)"""
    name, hparams = config
    loss_fn = get_loss(name, **dict(hparams, ratio_level="token"))
    weights = data.draw(token_weights(batch))
    out, grad = call(loss_fn, batch, token_weights=weights)
    removed = batch.mask & (weights == 0)
    assert (grad[removed] == 0).all()
    moved = replace(batch, logprobs=torch.where(removed, batch.logprobs - 0.7, batch.logprobs))
    torch.testing.assert_close(call(loss_fn, moved, token_weights=weights)[0].loss, out.loss, **TIGHT)


@given(policy_batches(), any_loss(), st.data())
def test_padding_weights_never_matter(batch, loss_fn, data):
    """NaN (or anything) in the weights of padding gives exactly the loss with 0 there."""
    weights = data.draw(token_weights(batch, padding_value=math.nan))
    out, grad = call(loss_fn, batch, token_weights=weights)
    zero_padded, zero_padded_grad = call(loss_fn, batch, token_weights=weights.nan_to_num(0.0))
    assert torch.isfinite(out.loss) and torch.equal(out.loss, zero_padded.loss)
    assert torch.equal(grad, zero_padded_grad)
    assert (grad[~batch.mask] == 0).all()


@given(policy_batches(), loss_configs(), st.data())
def test_split_batches_with_weights_match_whole(batch, config, data):
    """Weights leave the denominators alone, so micro-batches (trimmed to their own width) with the
    global normalizer stay exact."""
    name, hparams = config
    loss_fn = get_loss(name, **hparams)
    weights = data.draw(token_weights(batch))
    whole_loss, whole_grad = loss_and_grad(loss_fn, batch, token_weights=weights)

    parts = data.draw(splits(batch, whole_groups=name == "infonca"))
    total, grad = split_loss_and_grad(loss_fn, batch, parts, token_weights=weights)
    torch.testing.assert_close(total, whole_loss, **TIGHT)
    torch.testing.assert_close(grad, whole_grad, **TIGHT)


# ---------------------------------------------------------------- InfoNCA: one weight per answer


def stacked(batch: PolicyBatch, rows: torch.Tensor) -> PolicyBatch:
    return PolicyBatch(
        logprobs=batch.logprobs[rows],
        old_logprobs=batch.old_logprobs[rows],
        mask=batch.mask[rows],
        rewards=batch.rewards[rows],
        group_ids=batch.group_ids[rows],
    )


@given(policy_batches(), st.floats(0.01, 2.0), st.floats(0.0, 1.0), st.data())
def test_infonca_weighted_loss_equals_the_reference(batch, beta, sft_coef, data):
    """L_q = −Σ_k (w_k r_k / Σ_i w_i r_i)(β h_k − log Σ_i w_i e^{β h_i} + sft·mean_t log R), w_k the
    mean token weight of answer k (references.reference_infonca)."""
    weights = data.draw(token_weights(batch))
    hparams = dict(beta=beta, sft_coef=sft_coef)
    loss, grad = loss_and_grad(get_loss("infonca", **hparams), batch, token_weights=weights)
    assert math.isclose(loss.item(), reference_loss("infonca", hparams, batch, weights), rel_tol=1e-9, abs_tol=1e-12)
    assert torch.isfinite(grad).all()


@given(policy_batches(signal="all"), st.floats(0.01, 2.0), st.floats(0.0, 1.0), st.data())
def test_infonca_integer_answer_weight_is_that_many_copies(batch, beta, sft_coef, data):
    """An answer of weight c ∈ {0, 1, 2, 3} (on each of its tokens) is c copies of it in its group:
    the same loss, and its gradient is the sum of its copies' gradients. Weight 0 removes it.
    (An empty answer has no token weights and weight 1.)"""
    rows = batch.rewards.numel()
    copies = torch.tensor(data.draw(st.lists(st.integers(0, 3), min_size=rows, max_size=rows)))
    copies = torch.where(batch.lengths > 0, copies, 1)
    for group in batch.group_ids.unique():  # keep every group mixed after the removals
        members = batch.group_ids == group
        for reward in (0.0, 1.0):
            first = (members & (batch.rewards == reward)).nonzero()[0, 0]
            copies[first] = max(int(copies[first]), 1)
    loss_fn = get_loss("infonca", beta=beta, sft_coef=sft_coef)
    weights = copies[:, None].expand_as(batch.logprobs).to(batch.logprobs.dtype)
    weighted, weighted_grad = call(loss_fn, batch, token_weights=weights)

    index = torch.arange(rows).repeat_interleave(copies)
    copied = stacked(batch, index)
    copied_out, copied_grad = call(loss_fn, copied)
    torch.testing.assert_close(weighted.loss, copied_out.loss, **TIGHT)
    summed = torch.zeros_like(batch.logprobs).index_add(0, index, copied_grad)
    torch.testing.assert_close(weighted_grad, summed, **TIGHT)


@given(policy_batches(signal="all"), st.data())
def test_infonca_group_without_weighted_right_answers_contributes_zero(batch, data):
    weights = data.draw(token_weights(batch, padding_value=0.0))
    first_group = batch.group_ids == batch.group_ids[0]
    assume((batch.lengths[first_group & (batch.rewards == 1)] > 0).all())  # an empty answer has weight 1
    weights = torch.where((first_group & (batch.rewards == 1))[:, None], 0.0, weights)
    out, grad = call(get_loss("infonca"), batch, token_weights=weights)
    assert torch.isfinite(out.loss) and (grad[first_group] == 0).all()
    assume(not torch.equal(first_group, torch.ones_like(first_group)))
    rest = (~first_group).nonzero().flatten()
    rest_out, _ = call(get_loss("infonca"), stacked(batch, rest), token_weights=weights[rest], normalizer=len(batch.group_ids.unique()))
    torch.testing.assert_close(out.loss, rest_out.loss, **TIGHT)


# ---------------------------------------------------------------- the contract's edges


def test_a_loss_that_does_not_declare_weights_refuses_them(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    loss_fn = registry.register_loss("sequence_without_weights")(SequenceLossWithoutWeights)()
    args = (torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool), torch.tensor([1.0, 0.0]), torch.tensor([0, 0]))
    loss_fn(*args)  # fine without weights
    with pytest.raises(ValueError, match=r"sequence_without_weights does not declare how it uses token_weights"):
        loss_fn(*args, token_weights=torch.ones(2, 3))


@pytest.mark.parametrize(
    "weights, error, message",
    [
        (torch.ones(2, 2), ValueError, r"token_weights must have the shape of logprobs \[2, 3\], got \[2, 2\]"),
        (torch.ones(2, 3, dtype=torch.long), TypeError, r"token_weights must be None or a floating-point .* got torch.int64"),
        ([[1.0] * 3] * 2, TypeError, r"token_weights must be None or a floating-point .* got list"),
        (torch.tensor([[1.0, -0.5, 1.0], [1.0, 1.0, 1.0]]), ValueError, r"token_weights must be finite and >= 0 on response tokens, got \[-0\.5\] at \[\[0, 1\]\]"),
        (torch.tensor([[1.0, 1.0, 1.0], [math.inf, 1.0, math.nan]]), ValueError, r"token_weights must be finite and >= 0.*\[inf\] at \[\[1, 0\]\]"),
    ],
)
@pytest.mark.parametrize("name", ["nft", "infonca"])
def test_bad_weights_name_what_was_wrong(name, weights, error, message):
    mask = torch.tensor([[True, True, True], [True, True, False]])  # NaN on padding [1, 2] is fine
    args = (torch.zeros(2, 3), torch.zeros(2, 3), mask, torch.tensor([1.0, 0.0]), torch.tensor([0, 0]))
    with pytest.raises(error, match=message):
        get_loss(name)(*args, token_weights=weights)


def test_weights_are_constants_of_the_loss():
    """A weight tensor that requires grad is detached: no gradient flows into it."""
    weights = torch.full((2, 3), 0.5, requires_grad=True)
    logprobs = torch.zeros(2, 3, requires_grad=True)
    args = (torch.full((2, 3), -0.1), torch.ones(2, 3, dtype=torch.bool), torch.tensor([1.0, 0.0]), torch.tensor([0, 0]))
    get_loss("nft")(logprobs, *args, token_weights=weights).loss.backward()
    assert weights.grad is None and logprobs.grad.abs().sum() > 0
