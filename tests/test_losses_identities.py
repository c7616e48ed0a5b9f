"""Property tests: the identities of DESIGN.md that pin the six losses down (float64, autograd).

1. On-policy, ε ≤ 1: ∇NFT(ω=grpo) = ∇GRPO (= ∇DAPO), ∇NFT(ω=dr_grpo) = ∇Dr.GRPO under the same
   aggregation (Prop. 4.2, Remark A.3), at every ratio level; for ε > 1 the negative tokens'
   gradient shrinks by 1/ε.
2. NFT with neg_weight=0 and ω=constant is RFT; NFT is 0 at π_θ = π_old.
3. InfoNCA with K=2, one right and one wrong answer, is DPO with π_ref = π_old.
4. Off-policy gradients equal Eq. 11 (GRPO family: −A·R inside the clip region, 0 outside) and
   Eq. 12 (NFT: negative weight ω·r̂/(1 − r̂)·R / max((1 − r̂R)/(1 − r̂), ε)).
5. Theorem 3.1 on a bandit: the negative-only NFT objective drives π_θ to π⁺ = π·p(r=1|a)/r_q.
6. Micro-batches/ranks with the global normalizer sum to the whole batch's loss and gradient.
Plus: every loss value equals its equation, written out row by row with an independent reference
(polopt/testing/references.py, shared with the conformance kit).

Mutations tried by hand (each applied alone to a copy of polopt/losses, all three test_losses_*
files run with 60 derandomized examples; every mutation failed at least one test). Test names
without a file are in this module; numerics = test_losses_numerics.py, api = test_losses_api.py.

  mutation                                          caught by
  GRPO std unbiased (K − 1) instead of population   test_grpo_family_gradient_equals_nft_on_policy,
                                                    test_loss_values_match_the_equations, + 3
  std + 1e-6 in the GRPO advantage                  test_grpo_family_gradient_equals_nft_on_policy
                                                    (rtol 1e-9), test_loss_values_match_the_equations
  max_v without straight-through (plain clamp)      test_gradients_match_the_papers_analytic_form,
                                                    test_nft_differs_from_grpo_on_policy_when_epsilon_exceeds_one
  max_v as stop_grad[max(x, ε) − x] + x             numerics::test_nft_value_is_exact_at_extreme_log_ratios,
                                                    numerics::test_loss_and_gradient_are_finite_at_log_ratios_of_40
  token-mean ÷ sequences; token-sum ÷ tokens;       test_loss_values_match_the_equations,
  seq-mean-token-mean ↔ seq-mean-token-sum;         test_gradients_match_the_papers_analytic_form
  seq-mean-token-sum ÷ tokens; sum-norm without L   (+ api::test_global_normalizer_per_kind)
  ω choice swapped (dr_grpo ↔ grpo)                 test_grpo_family_gradient_equals_nft_on_policy
  per-micro-batch mean (normalizer ignored)         test_split_batches_with_global_normalizer_match_whole
  seq-mean-token-sum-norm with L = own width        test_split_batches_with_global_normalizer_match_whole
  correct_rate= ignored (r̂ from the rows given)     test_split_batches_with_global_normalizer_match_whole,
                                                    test_nft_drives_policy_to_positive_policy_on_a_bandit
  GRPO upper clip 1 + ε_low; clip sides swapped     test_gradients_match_the_papers_analytic_form
  NFT clips at min(ε, 1)                            test_nft_differs_from_grpo_on_policy_when_epsilon_exceeds_one
  NFT negative ratio without ÷ (1 − r̂)              test_grpo_family_gradient_equals_nft_on_policy,
                                                    test_nft_loss_is_zero_at_the_old_policy, + 5
  RFT weighted by 1 − r̂                             test_nft_without_negatives_and_constant_weight_is_rft
  InfoNCA weights r_k / K instead of r_k / Σ r_i    test_infonca_with_one_right_and_one_wrong_answer_is_dpo
  rows without signal not masked (token losses)     numerics::test_groups_without_signal_contribute_exactly_zero
  InfoNCA keeps all-right groups                    numerics::test_batches_of_all_right_or_all_wrong_groups_give_zero_loss_and_gradient
  no r̂ = ½ placeholder (0·inf at r̂ ∈ {0, 1})        numerics::test_groups_without_signal_contribute_exactly_zero, + 10
  padding × mask instead of torch.where             numerics::test_padding_is_ignored_even_when_it_holds_nan
  no cap on exp(log R); cap at ±20 (verl)           numerics::test_loss_and_gradient_are_finite_for_any_finite_log_ratio_in_float32;
                                                    numerics::test_nft_value_is_exact_at_extreme_log_ratios
  DAPO clip_high default 0.2                        api::test_defaults_follow_the_papers
  k3 KL direction flipped                           api::test_k3_kl_term_adds_kl_coef_times_k3
"""

from __future__ import annotations

import math

import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from strategies import (
    PolicyBatch,
    clip_ranges,
    epsilons_above_one,
    epsilons_at_most_one,
    loss_aggs,
    loss_configs,
    policy_batches,
    prompt_weights,
    splits,
)

from polopt.losses import get_loss, group_correct_rate
from polopt.losses.ratios import RATIO_LEVELS
from polopt.testing.references import TIGHT, analytic_gradient, dpo_loss, loss_and_grad, reference_loss, split_loss_and_grad


@given(policy_batches(), loss_configs())
def test_loss_values_match_the_equations(batch, config):
    """Every loss equals its equation (Eq. 3/4, 10, Appendix B) evaluated token by token."""
    name, hp = config
    loss, _ = loss_and_grad(get_loss(name, **hp), batch)
    assert math.isclose(loss.item(), reference_loss(name, hp, batch), rel_tol=1e-9, abs_tol=1e-12)


# ---------------------------------------------------------------- identity 1 (Prop. 4.2, Remark A.3)


@given(policy_batches(), loss_aggs, st.sampled_from(RATIO_LEVELS), epsilons_at_most_one, clip_ranges, clip_ranges, st.data())
def test_grpo_family_gradient_equals_nft_on_policy(batch, loss_agg, level, epsilon, clip_low, clip_high, data):
    """Prop. 4.2: at R = 1 and ε ≤ 1, ∇NFT(ω=grpo) = ∇GRPO = ∇DAPO and ∇NFT(ω=dr_grpo) = ∇Dr.GRPO,
    at every ratio level (on-policy each answer's ratio is 1 whatever the level, so both give each
    answer the same coefficient), with or without a clamp of log R above 0 and a constant normaliser."""
    batch = batch.on_policy()
    shared = dict(
        loss_agg=loss_agg,
        ratio_level=level,
        max_log_ratio=data.draw(st.none() | st.floats(0.01, 10.0)),
        constant_normalizer=data.draw(st.none() | st.floats(0.5, 1000.0)),
    )
    clip = dict(clip_low=clip_low, clip_high=clip_high, **shared)
    _, nft_grpo = loss_and_grad(get_loss("nft", epsilon=epsilon, prompt_weight="grpo", **shared), batch)
    _, nft_dr = loss_and_grad(get_loss("nft", epsilon=epsilon, prompt_weight="dr_grpo", **shared), batch)
    _, grpo = loss_and_grad(get_loss("grpo", **clip), batch)
    _, dapo = loss_and_grad(get_loss("dapo", **clip), batch)
    _, dr_grpo = loss_and_grad(get_loss("dr_grpo", **clip), batch)
    torch.testing.assert_close(nft_grpo, grpo, **TIGHT)
    torch.testing.assert_close(nft_grpo, dapo, **TIGHT)
    torch.testing.assert_close(nft_dr, dr_grpo, **TIGHT)
    assert grpo.abs().max() > 0  # the first group always has signal


def has_negative_signal_token(batch: PolicyBatch) -> bool:
    rate = group_correct_rate(batch.rewards, batch.group_ids)
    rows = (batch.rewards == 0) & (rate > 0) & (rate < 1)
    return bool((batch.mask & rows[:, None]).any())


@given(policy_batches(), loss_aggs, epsilons_above_one, st.sampled_from(["grpo", "dr_grpo"]))
def test_nft_differs_from_grpo_on_policy_when_epsilon_exceeds_one(batch, loss_agg, epsilon, weight):
    """ε > 1 breaks Prop. 4.2: max(1, ε) = ε scales the negative tokens' gradient by 1/ε."""
    assume(has_negative_signal_token(batch))
    batch = batch.on_policy()
    _, nft = loss_and_grad(get_loss("nft", epsilon=epsilon, prompt_weight=weight, loss_agg=loss_agg), batch)
    _, rl = loss_and_grad(get_loss(weight, loss_agg=loss_agg), batch)
    negative = (batch.rewards == 0)[:, None]
    torch.testing.assert_close(nft, torch.where(negative, rl / epsilon, rl), **TIGHT)
    assert (nft - rl)[negative.expand_as(nft)].abs().max() > 1e-6


# ---------------------------------------------------------------- identity 2


@given(policy_batches(), loss_aggs, st.floats(0.05, 3.0))
def test_nft_without_negatives_and_constant_weight_is_rft(batch, loss_agg, epsilon):
    nft = get_loss("nft", epsilon=epsilon, prompt_weight="constant", neg_weight=0.0, loss_agg=loss_agg)
    nft_loss, nft_grad = loss_and_grad(nft, batch)
    rft_loss, rft_grad = loss_and_grad(get_loss("rft", loss_agg=loss_agg), batch)
    torch.testing.assert_close(nft_loss, rft_loss, **TIGHT)
    torch.testing.assert_close(nft_grad, rft_grad, **TIGHT)


@given(policy_batches(), loss_aggs, epsilons_at_most_one, prompt_weights, st.floats(0.0, 2.0))
def test_nft_loss_is_zero_at_the_old_policy(batch, loss_agg, epsilon, weight, neg_weight):
    """Sec. 3.2: π_θ = π_old gives L = 0 exactly (R = 1, (1 − r̂)/(1 − r̂) = 1)."""
    nft = get_loss("nft", epsilon=epsilon, prompt_weight=weight, neg_weight=neg_weight, loss_agg=loss_agg)
    loss, _ = loss_and_grad(nft, batch.on_policy())
    assert loss.item() == 0.0


# ---------------------------------------------------------------- identity 3


@given(policy_batches(max_group_size=2, signal="all"), st.floats(0.01, 2.0))
def test_infonca_with_one_right_and_one_wrong_answer_is_dpo(batch, beta):
    """Appendix B: with K = 2, InfoNCA is DPO, −log σ(β(h_w − h_l)), with π_ref = π_old."""
    infonca_loss, infonca_grad = loss_and_grad(get_loss("infonca", beta=beta), batch)

    dpo_logprobs = batch.leaf()
    dpo = dpo_loss(dpo_logprobs, batch, beta)
    (dpo_grad,) = torch.autograd.grad(dpo, dpo_logprobs)
    torch.testing.assert_close(infonca_loss, dpo.detach(), **TIGHT)
    torch.testing.assert_close(infonca_grad, dpo_grad, **TIGHT)


# ---------------------------------------------------------------- identity 4 (Prop. 4.1, Eq. 11–12)


@given(
    policy_batches(max_log_ratio_scale=2.0),
    loss_configs(names=("nft", "rft", "grpo", "dr_grpo", "dapo")),
)
def test_gradients_match_the_papers_analytic_form(batch, config):
    """Off-policy: GRPO's gradient is −A·R inside the clip region and 0 outside (Eq. 11); NFT's
    negative weight is 1/max((1 − r̂R)/(1 − r̂), ε), with the straight-through gradient (Eq. 12)."""
    name, hp = config
    _, grad = loss_and_grad(get_loss(name, **hp), batch)
    torch.testing.assert_close(grad, analytic_gradient(name, hp, batch), **TIGHT)


# ---------------------------------------------------------------- identity 5 (Theorem 3.1)


@settings(max_examples=max(4, settings.default.max_examples // 6))
@given(
    st.lists(st.tuples(st.integers(1, 4), st.integers(1, 3)), min_size=2, max_size=5),
)
def test_nft_drives_policy_to_positive_policy_on_a_bandit(answers):
    """Theorem 3.1: minimising −E_{a∼π⁻} log((π(a) − r_q π_θ(a))/(1 − r_q)) (Eq. 8) gives π_θ = π⁺.

    A finite answer set; answer a has π(a) = c_a / C and p(r=1|a) = k_a / 4. The negative data is a
    perfectly balanced sample: answer a appears c_a (4 − k_a) times with reward 0, so its empirical
    distribution is π⁻ and the group's correct rate is r_q = Σ π p exactly. One token per answer,
    so token level = sequence level. Only negative rows enter the loss (r_q passed as correct_rate);
    ε = 0.05 lies below (1 − p)/(1 − r_q) ≥ 0.25, so the clip is inactive at the optimum.
    """
    counts = torch.tensor([c for c, _ in answers], dtype=torch.float64)
    p_right = torch.tensor([k for _, k in answers], dtype=torch.float64) / 4
    pi = counts / counts.sum()
    correct_rate = (pi * p_right).sum()
    pi_plus = pi * p_right / correct_rate

    answer_of_row = torch.tensor([a for a, (c, k) in enumerate(answers) for _ in range(c * (4 - k))])
    rows = answer_of_row.numel()
    old_logprobs = pi.log()[answer_of_row][:, None]
    mask = torch.ones(rows, 1, dtype=torch.bool)
    rewards, group_ids = torch.zeros(rows), torch.zeros(rows, dtype=torch.long)
    loss_fn = get_loss("nft", epsilon=0.05, prompt_weight="constant")

    logits = pi.log().clone().requires_grad_(True)  # π_θ ← π (Algorithm 1, line 10)
    steps = 300
    optimizer = torch.optim.Adam([logits], lr=0.1)
    # Linear decay to 0: Adam's step does not shrink with the gradient, so without it π_θ jitters
    # around the optimum (and leaves it when π⁺ = π, where the gradient is float noise).
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / steps)
    for _ in range(steps):
        logprobs = torch.log_softmax(logits, dim=0)[answer_of_row][:, None]
        out = loss_fn(logprobs, old_logprobs, mask, rewards, group_ids, correct_rate=correct_rate.expand(rows))
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        schedule.step()
    torch.testing.assert_close(torch.softmax(logits.detach(), dim=0), pi_plus, rtol=0, atol=1e-5)


# ---------------------------------------------------------------- identity 6


@given(policy_batches(), loss_configs(), st.data())
def test_split_batches_with_global_normalizer_match_whole(batch, config, data):
    """Micro-batches (or ranks), each trimmed to its own longest response and given r̂ of the whole
    groups, summed with the global normalizer, give the whole batch's loss and gradient."""
    name, hp = config
    loss_fn = get_loss(name, **hp)
    whole_loss, whole_grad = loss_and_grad(loss_fn, batch)

    parts = data.draw(splits(batch, whole_groups=name == "infonca"))
    total, grad = split_loss_and_grad(loss_fn, batch, parts)
    torch.testing.assert_close(total, whole_loss, **TIGHT)
    torch.testing.assert_close(grad, whole_grad, **TIGHT)
