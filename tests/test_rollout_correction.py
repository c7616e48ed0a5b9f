"""Rollout-mismatch correction (polopt/rollout/correction.py): each mode's weights against its
formula written out per row, identical log-probs → weights exactly 1 and the uncorrected loss and
gradient bit for bit for every loss, padding never read, the metrics, and the config checks."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from omegaconf import OmegaConf
from strategies import loss_configs, policy_batches

from polopt.losses import get_loss
from polopt.recipe_config import ConfigError, validate_config
from polopt.rollout.correction import LEVELS, MODES, RolloutCorrection
from polopt.testing.references import loss_and_grad

corrections = st.builds(
    RolloutCorrection,
    enabled=st.just(True),
    level=st.sampled_from(LEVELS),
    mode=st.sampled_from(MODES),
    cap=st.floats(1.0, 5.0),
    min_ratio=st.one_of(st.none(), st.floats(0.0, 1.0)),
)


@st.composite
def rollout_logprobs(draw, batch, scale: float = 0.5):
    """The engine's log-probs: π_old's plus noise on tokens (sometimes none), garbage on padding."""
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    noise = draw(st.sampled_from([0.0, 1e-6, scale])) * torch.randn(batch.old_logprobs.shape, generator=g, dtype=torch.float64)
    return torch.where(batch.mask, batch.old_logprobs + noise.to(batch.old_logprobs.dtype), 50.0)


def written_out(correction: RolloutCorrection, old, rollout, mask) -> torch.Tensor:
    """The module docstring's formulas, one row and one token at a time."""
    lower = correction.min_ratio
    out = torch.ones_like(old)
    for b in range(old.shape[0]):
        tokens = [t for t in range(old.shape[1]) if mask[b, t]]
        sequence = math.exp(min(80.0, sum(float(old[b, t]) - float(rollout[b, t]) for t in tokens)))
        for t in tokens:
            ratio = sequence if correction.level == "sequence" else math.exp(min(80.0, float(old[b, t]) - float(rollout[b, t])))
            if correction.mode == "truncate":
                w = min(ratio, correction.cap) if lower is None else min(max(ratio, lower), correction.cap)
            else:
                w = ratio if ratio <= correction.cap and (lower is None or ratio >= lower) else 0.0
            out[b, t] = w
    return out


@given(data=st.data(), correction=corrections)
def test_each_mode_matches_its_formula(data, correction):
    batch = data.draw(policy_batches())
    rollout = data.draw(rollout_logprobs(batch))
    weights, _ = correction.weights(batch.old_logprobs, rollout, batch.mask)
    torch.testing.assert_close(weights, written_out(correction, batch.old_logprobs, rollout, batch.mask), rtol=1e-12, atol=1e-12)
    assert not weights.requires_grad


@given(data=st.data(), correction=corrections)
def test_padding_is_never_read_and_gets_weight_one(data, correction):
    batch = data.draw(policy_batches())
    rollout = data.draw(rollout_logprobs(batch))
    weights, metrics = correction.weights(batch.old_logprobs, rollout, batch.mask)
    garbage = data.draw(st.sampled_from([math.nan, math.inf, -math.inf, -1e30]))
    other, other_metrics = correction.weights(
        torch.where(batch.mask, batch.old_logprobs, garbage), torch.where(batch.mask, rollout, -garbage), batch.mask
    )
    assert torch.equal(weights, other) and metrics == other_metrics
    assert bool((weights[~batch.mask] == 1).all())


@given(data=st.data(), correction=corrections, loss=loss_configs())
def test_identical_logprobs_give_weights_one_and_the_uncorrected_loss(data, correction, loss):
    """Engine and trainer agree → w = 1 exactly → loss and gradient bit for bit those without
    correction, for every registered loss."""
    batch = data.draw(policy_batches())
    weights, metrics = correction.weights(batch.old_logprobs, batch.old_logprobs.clone(), batch.mask)
    assert bool((weights == 1).all())
    if metrics:
        assert metrics["rollout_correction/ratio_min"] == metrics["rollout_correction/ratio_max"] == 1.0
        assert metrics["rollout_correction/logprob_abs_diff_mean"] == 0.0
    name, hparams = loss
    loss_fn = get_loss(name, **hparams)
    plain_loss, plain_grad = loss_and_grad(loss_fn, batch)
    weighted_loss, weighted_grad = loss_and_grad(loss_fn, batch, token_weights=weights)
    assert torch.equal(plain_loss, weighted_loss) or (plain_loss.isnan() and weighted_loss.isnan())
    assert torch.equal(plain_grad, weighted_grad)


@given(data=st.data(), correction=corrections)
def test_metrics_describe_the_ratios(data, correction):
    batch = data.draw(policy_batches(min_len=1))
    rollout = data.draw(rollout_logprobs(batch))
    weights, metrics = correction.weights(batch.old_logprobs, rollout, batch.mask)
    delta = (batch.old_logprobs - rollout).double()[batch.mask]
    if correction.level == "token":
        ratios = delta.clamp(max=80).exp()
    else:
        per_row = torch.where(batch.mask, (batch.old_logprobs - rollout).double(), 0.0).sum(-1).clamp(max=80).exp()
        ratios = per_row[:, None].expand_as(batch.mask)[batch.mask]
    assert metrics["rollout_correction/ratio_min"] == pytest.approx(ratios.min().item(), rel=1e-12)
    assert metrics["rollout_correction/ratio_max"] == pytest.approx(ratios.max().item(), rel=1e-12)
    assert metrics["rollout_correction/ratio_mean"] == pytest.approx(ratios.mean().item(), rel=1e-9)
    assert metrics["rollout_correction/logprob_abs_diff_mean"] == pytest.approx(delta.abs().mean().item(), rel=1e-9)
    key = "capped_fraction" if correction.mode == "truncate" else "masked_fraction"
    lower = correction.min_ratio if correction.min_ratio is not None else -1.0
    outside = ((ratios > correction.cap) | (ratios < lower)).double().mean().item()
    assert metrics[f"rollout_correction/{key}"] == pytest.approx(outside, abs=1e-12)


def test_disabled_correction_gives_no_weights_but_metrics():
    old, rollout, mask = torch.zeros(2, 3), torch.full((2, 3), -0.5), torch.ones(2, 3, dtype=torch.bool)
    weights, metrics = RolloutCorrection().weights(old, rollout, mask)
    assert weights is None and metrics["rollout_correction/ratio_max"] == pytest.approx(math.exp(0.5))


@pytest.mark.parametrize(
    "section, message",
    [
        ({"level": "tokens"}, "rollout_correction.level must be one of token, sequence, got 'tokens'"),
        ({"mode": "clip"}, "rollout_correction.mode must be one of truncate, mask, got 'clip'"),
        ({"cap": 0.5}, r"rollout_correction.cap must be >= 1"),
        ({"min_ratio": 2.0}, r"rollout_correction.min_ratio must be None or in \[0, 1\]"),
        ({"enabled": True}, "rollout_correction.enabled needs recompute_old_logprobs: true"),
        ({"capp": 3.0}, "unknown config key 'rollout_correction.capp'"),
    ],
)
def test_bad_rollout_correction_config_is_a_config_error(section, message):
    from recipes.online_rl_distributed import _setup_rollout_correction

    cfg = OmegaConf.load("configs/tiny_arith.yaml")
    cfg.rollout_correction = section
    with pytest.raises(ConfigError, match=message):
        _setup_rollout_correction(validate_config(cfg))
