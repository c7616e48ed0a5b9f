"""Numerics: extreme log-ratios, groups without signal, padding and empty rows, low-precision inputs."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from hypothesis import given
from strategies import PolicyBatch, extreme_batches, loss_configs, policy_batches

from polopt.losses import BUILTIN_LOSSES, get_loss, group_correct_rate


def run(loss_fn, batch: PolicyBatch, dtype: torch.dtype = torch.float64, **kwargs):
    logprobs = batch.logprobs.to(dtype).detach().requires_grad_(True)
    out = loss_fn(logprobs, batch.old_logprobs.to(dtype), batch.mask, batch.rewards, batch.group_ids, **kwargs)
    out.loss.backward()
    return out, logprobs.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@given(batch=extreme_batches(magnitude=40.0), config=loss_configs())
def test_loss_and_gradient_are_finite_at_log_ratios_of_40(dtype, batch, config):
    name, hp = config
    out, grad = run(get_loss(name, **hp), batch, dtype)
    assert torch.isfinite(out.loss) and torch.isfinite(grad).all()
    assert all(math.isfinite(v) for v in out.metrics.values())


@given(batch=extreme_batches(magnitude=1e4), config=loss_configs())
def test_loss_and_gradient_are_finite_for_any_finite_log_ratio_in_float32(batch, config):
    name, hp = config
    out, grad = run(get_loss(name, **hp), batch, torch.float32)
    assert torch.isfinite(out.loss) and torch.isfinite(grad).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("epsilon", [1e-3, 0.5, 1.0, 2.0])
def test_nft_value_is_exact_at_extreme_log_ratios(dtype, epsilon):
    """A negative token at log-ratio +40 (r̂ = ½) has (1 − r̂R)/(1 − r̂) ≈ −2e17: max_v must give
    exactly ε (value) and the gradient of x (Eq. 12: weight r̂/(1 − r̂)·R/ε); a positive token at
    −40 gives 40. The cancellation-prone stop_grad[max(x, ε) − x] + x returns 0 (then log → −inf)."""
    logprobs = torch.tensor([[-40.0], [40.0]], dtype=torch.float64)
    batch = PolicyBatch(
        logprobs=logprobs - 50,
        old_logprobs=torch.full((2, 1), -50.0, dtype=torch.float64),
        mask=torch.ones(2, 1, dtype=torch.bool),
        rewards=torch.tensor([1.0, 0.0]),
        group_ids=torch.tensor([0, 0]),
    )
    loss_fn = get_loss("nft", epsilon=epsilon, prompt_weight="constant", loss_agg="token-sum")
    out, grad = run(loss_fn, batch, dtype)
    assert out.loss.dtype == dtype
    assert out.loss.item() == pytest.approx(40.0 - math.log(epsilon), rel=1e-6)
    assert grad[0, 0].item() == -1.0
    assert grad[1, 0].item() == pytest.approx(math.exp(40.0) / epsilon, rel=1e-5)
    assert out.metrics["neg_clip_frac"] == 1.0


@given(batch=extreme_batches(magnitude=40.0), config=loss_configs())
def test_groups_without_signal_contribute_exactly_zero(batch, config):
    """Rows of groups with r̂ ∈ {0, 1} get exactly 0 gradient (no 0·inf NaN, e.g. ω = grpo at r̂ = 0),
    and a batch of only such groups has loss exactly 0."""
    name, hp = config
    out, grad = run(get_loss(name, **hp), batch)
    rate = group_correct_rate(batch.rewards, batch.group_ids)
    without_signal = (rate == 0) | (rate == 1)
    assert torch.isfinite(grad).all()
    assert (grad[without_signal] == 0).all()


@given(batch=policy_batches(signal="none", max_log_ratio_scale=40.0), config=loss_configs())
def test_batches_of_all_right_or_all_wrong_groups_give_zero_loss_and_gradient(batch, config):
    name, hp = config
    out, grad = run(get_loss(name, **hp), batch)
    assert out.loss.item() == 0.0
    assert (grad == 0).all()


@given(batch=policy_batches(padding_value=math.nan), config=loss_configs())
def test_padding_is_ignored_even_when_it_holds_nan(batch, config):
    """Padding may hold anything: the loss and gradient equal those with zero padding, and the
    gradient on padding and on empty rows is exactly 0."""
    name, hp = config
    loss_fn = get_loss(name, **hp)
    out, grad = run(loss_fn, batch)
    zero_padded = replace(batch, logprobs=batch.logprobs.nan_to_num(0.0), old_logprobs=batch.old_logprobs.nan_to_num(0.0))
    reference, reference_grad = run(loss_fn, zero_padded)
    assert torch.isfinite(out.loss)
    assert out.loss.item() == reference.loss.item()
    assert torch.equal(grad, reference_grad)
    assert (grad[~batch.mask] == 0).all()


@pytest.mark.parametrize("name", BUILTIN_LOSSES)
def test_all_empty_mask_gives_zero_gradient(name):
    """No response tokens: zero gradient; token-level losses are 0, InfoNCA is log K (all h_k = 0)."""
    batch = PolicyBatch(
        logprobs=torch.randn(4, 3, dtype=torch.float64),
        old_logprobs=torch.randn(4, 3, dtype=torch.float64),
        mask=torch.zeros(4, 3, dtype=torch.bool),
        rewards=torch.tensor([1.0, 0.0, 1.0, 0.0]),
        group_ids=torch.tensor([0, 0, 1, 1]),
    )
    out, grad = run(get_loss(name), batch)
    assert (grad == 0).all()
    assert out.loss.item() == pytest.approx(math.log(2) if name == "infonca" else 0.0, abs=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@given(batch=policy_batches(), config=loss_configs())
def test_low_precision_inputs_are_computed_in_float32(dtype, batch, config):
    """bf16/fp16 log-probs: the loss is computed (and returned) in fp32, matching fp64 math on the
    same rounded inputs to fp32 precision."""
    name, hp = config
    loss_fn = get_loss(name, **hp)
    rounded = replace(batch, logprobs=batch.logprobs.to(dtype).double(), old_logprobs=batch.old_logprobs.to(dtype).double())
    out, grad = run(loss_fn, rounded, dtype)
    exact, _ = run(loss_fn, rounded, torch.float64)
    assert out.loss.dtype == torch.float32 and grad.dtype == dtype
    scale = max(1.0, abs(exact.loss.item()))
    assert abs(out.loss.item() - exact.loss.item()) <= 1e-5 * scale
