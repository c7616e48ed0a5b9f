"""The decoupled objective of stale rollouts (docs/rollout.md, "Stale rollouts"): every loss takes its
ratio R_t = π_θ/π_prox against the proximal policy π_prox (π_old, recomputed by the trainer at the
start of the update) and `token_weights` w_t = π_prox/π_b from the rollout correction
(polopt.rollout.correction.RolloutCorrection), π_b the behaviour policy that sampled.

Pinned here, for every registered loss, through the public API (RolloutCorrection.weights, then the
loss with `token_weights=`, as the recipe composes them):

- staleness 0 (π_b = π_prox) is the synchronous call without weights, loss, gradient and metrics
  bit for bit (test_rollout_correction.py pins the weights of 1; here the composition, with the
  engine's padding unlike the trainer's, and the correction on or off);
- at the first update of a mini-batch (π_θ = π_prox, R = 1) the gradient is the importance-weighted
  on-policy gradient: for a token-level loss Σ_t w_t · a_t · c_t ∇log π_t, c_t = ∂ℓ_t/∂log π_t at
  R = 1 written from the papers (Eq. 11: −A for the GRPO family, Eq. 12 for NFT, −r for RFT), a_t
  the aggregation weight, summed over the answer at a sequence ratio level; equivalently the
  on-policy gradient times w, token by token. InfoNCA (one weight per answer, infonca.py): the
  self-normalised importance-weighted on-policy gradient β (w_k/Σ_i w_i − w_k r_k/Σ_i w_i r_i);
- GRPO's clip sits around π_prox: with untruncated weights the first-update gradient equals the
  coupled PPO gradient against π_b wherever that one's clip is inactive, and stays w·(on-policy)
  where the coupled clip would zero it.

Mutations tried by hand (each alone, patched in a copy of this file): the weights not passed to the
loss (token_weights=None in `decoupled`) — caught by
test_first_update_gradient_is_the_importance_weighted_on_policy_gradient; NFT's max_v as a plain
clamp (no straight-through gradient where ε > 1 clips) — caught by the same test; InfoNCA's
partition function without the weights — caught by
test_infonca_first_update_gradient_is_self_normalised_importance_weighted.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from hypothesis import given
from hypothesis import strategies as st
from strategies import PolicyBatch, loss_configs, policy_batches

from polopt.losses import BUILTIN_LOSSES, GRPO_FAMILY, TOKEN_LEVEL_LOSSES, get_loss, group_correct_rate, list_losses
from polopt.rollout.correction import LEVELS, MODES, RolloutCorrection
from polopt.testing.references import TIGHT, aggregation_weights, loss_and_grad, reference_group_stats

# Small batches: the behaviour log-probs are drawn token by token (so they shrink), ≤ 3 × 6 rows × 6 tokens.
small_batches = dict(max_groups=3, max_group_size=6, max_len=6)

corrections = st.builds(
    RolloutCorrection,
    enabled=st.booleans(),
    level=st.sampled_from(LEVELS),
    mode=st.sampled_from(MODES),
    cap=st.floats(1.0, 5.0),
    min_ratio=st.none() | st.floats(0.0, 1.0),
)


@st.composite
def behaviour_logprobs(draw, batch: PolicyBatch) -> torch.Tensor:
    """log π_b = log π_prox − δ, δ ∈ [−2, 2] drawn per token (π_prox/π_b = e^δ up to ~7.4), and
    garbage on padding (the engine's, unlike the trainer's)."""
    rows, width = batch.old_logprobs.shape
    delta = torch.tensor(draw(st.lists(st.floats(-2.0, 2.0), min_size=rows * width, max_size=rows * width)),
                         dtype=torch.float64).reshape(rows, width)
    return torch.where(batch.mask, batch.old_logprobs - delta.to(batch.old_logprobs.dtype), -77.0)


def decoupled(loss_fn, batch: PolicyBatch, behaviour: torch.Tensor, correction: RolloutCorrection):
    """What the recipe does: w from π_prox (batch.old_logprobs) and π_b, then the loss with them.
    (loss, grad, metrics, w)."""
    weights, _ = correction.weights(batch.old_logprobs, behaviour, batch.mask)
    logprobs = batch.leaf()
    out = loss_fn(logprobs, batch.old_logprobs, batch.mask, batch.rewards, batch.group_ids, token_weights=weights)
    (grad,) = torch.autograd.grad(out.loss, logprobs, allow_unused=True)
    return out.loss.detach(), torch.zeros_like(logprobs) if grad is None else grad, out.metrics, weights


def test_every_registered_loss_is_drawn():
    """loss_configs() draws BUILTIN_LOSSES, the losses polopt registers; a new one needs its R = 1
    coefficient in on_policy_coefficients (or a test of its own, as InfoNCA has)."""
    assert set(BUILTIN_LOSSES) <= set(list_losses())
    assert set(BUILTIN_LOSSES) == {"nft", "rft", "grpo", "dr_grpo", "dapo", "infonca"}


@given(policy_batches(), loss_configs(), corrections, st.data())
def test_staleness_zero_is_the_synchronous_loss(batch, config, correction, data):
    """π_b = π_prox on tokens (the engine's log-probs are the trainer's): the decoupled call is the
    synchronous one — π_old = the sampling policy, no weights — bit for bit, at any π_θ (later
    mini-batches too), whatever the correction's settings, whatever the engine left on padding."""
    name, hparams = config
    loss_fn = get_loss(name, **hparams)
    garbage = data.draw(st.sampled_from([0.0, -77.0, math.nan, math.inf]))
    behaviour = torch.where(batch.mask, batch.old_logprobs.clone(), garbage)
    loss, grad, metrics, weights = decoupled(loss_fn, batch, behaviour, correction)
    assert weights is None or bool((weights[batch.mask] == 1).all())

    logprobs = batch.leaf()
    sync = loss_fn(logprobs, batch.old_logprobs, batch.mask, batch.rewards, batch.group_ids)
    (sync_grad,) = torch.autograd.grad(sync.loss, logprobs, allow_unused=True)
    sync_grad = torch.zeros_like(logprobs) if sync_grad is None else sync_grad
    assert torch.equal(loss, sync.loss.detach()) or (loss.isnan() and sync.loss.isnan())
    assert torch.equal(grad, sync_grad)
    metrics.pop("token_weight_mean", None)
    assert metrics == sync.metrics


def on_policy_coefficients(name: str, hp: dict, batch: PolicyBatch) -> torch.Tensor:
    """c_b = ∂ℓ_bt/∂log π_θ at R = 1 (the same for every token of answer b), from the papers:
    RFT −r; GRPO/DAPO −(r − r̂)/σ, Dr.GRPO −(r − r̂) (Eq. 11, the clip inactive at R = 1); NFT
    (Eq. 12 at R = 1) ω(r̂)·(−1) on right answers, ω(r̂)·neg_weight·r̂/(1 − r̂)/max(1, ε) on wrong ones,
    r̂ clipped by correct_rate_clip. 0 in groups with r̂ ∈ {0, 1}."""
    rates, stds = reference_group_stats(batch)
    out = []
    for reward, rate, std in zip(batch.rewards.tolist(), rates, stds):
        if not 0 < rate < 1:
            out.append(0.0)
        elif name == "rft":
            out.append(-reward)
        elif name in ("grpo", "dapo"):
            out.append(-(reward - rate) / std)
        elif name == "dr_grpo":
            out.append(-(reward - rate))
        elif name == "nft":
            if hp.get("correct_rate_clip") is not None:
                rate = min(max(rate, hp["correct_rate_clip"][0]), hp["correct_rate_clip"][1])
            omega = {"constant": 1.0, "dr_grpo": 1 - rate, "grpo": math.sqrt((1 - rate) / rate)}[hp["prompt_weight"]]
            negative = hp["neg_weight"] * rate / (1 - rate) / max(1.0, hp["epsilon"])
            out.append(omega * (-1.0 if reward == 1 else negative))
        else:
            raise AssertionError(f"no on-policy coefficient written for {name}")
    return torch.tensor(out, dtype=torch.float64)


@given(policy_batches(**small_batches).map(PolicyBatch.on_policy), loss_configs(names=TOKEN_LEVEL_LOSSES), corrections, st.data())
def test_first_update_gradient_is_the_importance_weighted_on_policy_gradient(batch, config, correction, data):
    """π_θ = π_prox: ∂loss/∂log π_bt = w_bt · a_bt · c_b (token level), Σ_s w_bs a_bs c_b over the answer
    (sequence_sum; ÷ n for sequence_mean); at token level also exactly w ⊙ the unweighted gradient."""
    name, hparams = config
    loss_fn = get_loss(name, **hparams)
    behaviour = data.draw(behaviour_logprobs(batch))
    correction = replace(correction, enabled=True)
    _, grad, _, weights = decoupled(loss_fn, batch, behaviour, correction)

    weighted = on_policy_coefficients(name, hparams, batch)[:, None] * torch.where(batch.mask, weights, 0.0)
    weighted = weighted * aggregation_weights(batch.mask, hparams["loss_agg"], hparams.get("max_response_len"),
                                              hparams.get("constant_normalizer"))
    level = hparams.get("ratio_level", "token")
    if level == "token":
        expected = weighted
        _, on_policy_grad = loss_and_grad(loss_fn, batch)
        torch.testing.assert_close(grad, torch.where(batch.mask, weights, 0.0) * on_policy_grad, **TIGHT)
    else:
        per_answer = weighted.sum(dim=1, keepdim=True)
        if level == "sequence_mean":
            per_answer = per_answer / batch.lengths[:, None].clamp(min=1)
        expected = torch.where(batch.mask, per_answer, 0.0)
    torch.testing.assert_close(grad, expected, **TIGHT)


@given(policy_batches(**small_batches).map(PolicyBatch.on_policy), loss_configs(names=GRPO_FAMILY, options=False), st.data())
def test_grpo_clip_is_around_the_proximal_policy(batch, config, data):
    """Untruncated weights w = ρ = π_prox/π_b, π_θ = π_prox. The coupled PPO loss against π_b (its
    ratio ρ) has gradient −A ρ a on tokens inside its clip and 0 outside; the decoupled gradient is
    −A w a on every token: the same inside, and outside still the importance-weighted on-policy one
    (the clip bounds how far π_θ moves from π_prox, not how stale the data is)."""
    name, hparams = config
    loss_fn = get_loss(name, **hparams)
    behaviour = data.draw(behaviour_logprobs(batch))
    _, grad, _, rho = decoupled(loss_fn, batch, behaviour, RolloutCorrection(enabled=True, cap=math.inf))
    assert torch.equal(rho[batch.mask], (batch.old_logprobs - behaviour).exp()[batch.mask])
    coupled = replace(batch, old_logprobs=behaviour)
    _, coupled_grad = loss_and_grad(loss_fn, coupled)
    _, on_policy_grad = loss_and_grad(loss_fn, batch)

    rate = group_correct_rate(batch.rewards, batch.group_ids)
    advantage_sign = (batch.rewards - rate).sign()[:, None]
    upper, lower = 1 + hparams["clip_high"], 1 - hparams["clip_low"]
    inside = ((advantage_sign > 0) & (rho < upper)) | ((advantage_sign < 0) & (rho > lower))
    on_boundary = ((rho - upper).abs() < 1e-9) | ((rho - lower).abs() < 1e-9)
    tokens = batch.mask & ~on_boundary
    torch.testing.assert_close(grad[tokens & inside], coupled_grad[tokens & inside], **TIGHT)
    assert bool((coupled_grad[tokens & ~inside] == 0).all())
    torch.testing.assert_close(grad[tokens], (rho * on_policy_grad)[tokens], **TIGHT)


@given(policy_batches(**small_batches).map(PolicyBatch.on_policy), st.floats(0.01, 2.0), st.floats(0.0, 1.0),
       corrections, st.data())
def test_infonca_first_update_gradient_is_self_normalised_importance_weighted(batch, beta, sft_coef, correction, data):
    """InfoNCA weighs answer k by w_k, the mean of its token weights (infonca.py). At π_θ = π_prox
    (h = 0) each token of answer j in group q gets, over the batch's G groups,

        ∂loss/∂log π = [β w_j/Σ_i w_i − (w_j r_j/Σ_i w_i r_i)(β + sft/n_j)] / G

    the on-policy gradient β(1/K − r_j/Σ_i r_i) − … with the sample averages self-normalised by the
    importance weights; 0 in groups with r̂ ∈ {0, 1} or no weighted right answer."""
    loss_fn = get_loss("infonca", beta=beta, sft_coef=sft_coef)
    behaviour = data.draw(behaviour_logprobs(batch))
    _, grad, _, weights = decoupled(loss_fn, batch, behaviour, replace(correction, enabled=True))

    lengths = batch.lengths.tolist()
    answer = [sum(weights[b, :n].tolist()) / n if n else 1.0 for b, n in enumerate(lengths)]
    rewards, groups = batch.rewards.tolist(), batch.group_ids.tolist()
    num_groups = len(set(groups))
    expected = torch.zeros_like(grad)
    for gid in set(groups):
        rows = [b for b in range(len(groups)) if groups[b] == gid]
        right = sum(rewards[b] for b in rows)
        total, positive = sum(answer[b] for b in rows), sum(answer[b] * rewards[b] for b in rows)
        if right in (0, len(rows)) or positive == 0:
            continue
        for b in rows:
            if lengths[b]:
                g = beta * answer[b] / total - answer[b] * rewards[b] / positive * (beta + sft_coef / lengths[b])
                expected[b, : lengths[b]] = g / num_groups
    torch.testing.assert_close(grad, expected, **TIGHT)
