"""Independent reference formulas for the six losses, written from the paper's equations.

Plain Python over lists (group statistics, per-token terms, verl's aggregation weights) and the
analytic gradients of Prop. 4.1 / Eq. 11–12, so that polopt's own losses (tests/) and any
third-party loss (`check_policy_loss`) are held to the same written-out math, not to each other.
"""

from __future__ import annotations

import math
import statistics
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from polopt.testing.strategies import PolicyBatch

# Float64 agreement of two implementations of the same equation.
TIGHT = dict(rtol=1e-9, atol=1e-12)


def loss_and_grad(loss_fn: Callable, batch: PolicyBatch, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, ∂loss/∂logprobs) of `loss_fn` on `batch`; `loss_fn` returns a LossOutput or a scalar."""
    logprobs = batch.leaf()
    out = loss_fn(logprobs, batch.old_logprobs, batch.mask, batch.rewards, batch.group_ids, **kwargs)
    loss = out.loss if hasattr(out, "loss") else out
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise TypeError(f"the loss function must return a scalar tensor (or a LossOutput), got {type(loss).__name__}")
    (grad,) = torch.autograd.grad(loss.reshape(()), logprobs, allow_unused=True)
    return loss.detach().reshape(()), torch.zeros_like(logprobs) if grad is None else grad


def split_loss_and_grad(
    loss_fn: Callable, batch: PolicyBatch, parts: list[torch.Tensor], token_weights: Optional[torch.Tensor] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ of the losses of micro-batches `parts` (row indices) and the summed gradient, each part
    trimmed to its own longest response and given r̂ of the whole groups and the whole batch's
    normalizer: equal to the whole batch's loss and gradient for an exact loss."""
    from polopt.losses import global_normalizer, group_correct_rate  # polopt's own helpers under test

    normalizer = global_normalizer(loss_fn, batch.mask, group_ids=batch.group_ids)
    correct_rate = group_correct_rate(batch.rewards, batch.group_ids)
    logprobs = batch.leaf()
    total = torch.zeros((), dtype=logprobs.dtype)
    for rows in parts:
        width = max(int(batch.lengths[rows].max()), 1)
        weights = {} if token_weights is None else dict(token_weights=token_weights[rows, :width])
        out = loss_fn(
            logprobs[rows, :width],
            batch.old_logprobs[rows, :width],
            batch.mask[rows, :width],
            batch.rewards[rows],
            batch.group_ids[rows],
            correct_rate=correct_rate[rows],
            normalizer=normalizer,
            **weights,
        )
        out.loss.backward()
        total = total + out.loss.detach()
    return total, logprobs.grad


def reference_group_stats(batch: PolicyBatch) -> tuple[list[float], list[float]]:
    """r̂ and population std of each row's group, from Python lists."""
    members: dict[int, list[float]] = {}
    for gid, reward in zip(batch.group_ids.tolist(), batch.rewards.tolist()):
        members.setdefault(gid, []).append(reward)
    rate = [statistics.fmean(members[g]) for g in batch.group_ids.tolist()]
    std = [statistics.pstdev(members[g]) for g in batch.group_ids.tolist()]
    return rate, std


def aggregation_weights(
    mask: torch.Tensor, loss_agg: str, horizon: Optional[int] = None, constant_normalizer: Optional[float] = None
) -> torch.Tensor:
    """w [B, T] with loss = Σ_bt w_bt ℓ_bt, from verl's definitions of the five modes; a constant
    normaliser C divides the mode's numerator (Σ_bt m ℓ, or Σ_b mean_t ℓ) by C instead."""
    rows, width = mask.shape
    m = mask.double()
    lengths = m.sum(dim=1, keepdim=True)
    if constant_normalizer is not None:
        per_row = torch.where(lengths > 0, m / lengths.clamp(min=1), 0.0) if loss_agg == "seq-mean-token-mean" else m
        return per_row / constant_normalizer
    if loss_agg == "token-mean":
        return m / max(m.sum().item(), 1)
    if loss_agg == "token-sum":
        return m
    if loss_agg == "seq-mean-token-mean":
        return torch.where(lengths > 0, m / lengths.clamp(min=1), 0.0) / rows
    if loss_agg == "seq-mean-token-sum":
        return m / rows
    if loss_agg == "seq-mean-token-sum-norm":
        return m / (rows * (horizon or width))
    raise ValueError(f"unknown loss_agg {loss_agg!r}")


def reference_log_ratios(batch: PolicyBatch, hp: dict) -> list[list[float]]:
    """Per row, the log-ratio each response token's loss uses: log R_t ("token"), the answer's
    Σ_t log R_t ("sequence_sum") or its mean ("sequence_mean"), then min(·, max_log_ratio)."""
    level, cap = hp.get("ratio_level", "token"), hp.get("max_log_ratio")
    rows = []
    for b in range(batch.mask.shape[0]):
        n = int(batch.mask[b].sum())
        tokens = (batch.logprobs[b, :n] - batch.old_logprobs[b, :n]).tolist()
        if level == "sequence_sum":
            tokens = [sum(tokens)] * n
        elif level == "sequence_mean" and n:
            tokens = [sum(tokens) / n] * n
        rows.append([x if cap is None else min(x, cap) for x in tokens])
    return rows


def reference_token_loss(name: str, hp: dict, reward: float, rate: float, std: float, log_ratio: float) -> float:
    ratio = math.exp(log_ratio)
    if name == "rft":
        return reward * -log_ratio
    if name == "nft":
        if hp.get("correct_rate_clip") is not None:
            low, high = hp["correct_rate_clip"]
            rate = min(max(rate, low), high)
        omega = {"constant": 1.0, "dr_grpo": 1 - rate, "grpo": math.sqrt((1 - rate) / rate)}[hp["prompt_weight"]]
        negative = -math.log(max((1 - rate * ratio) / (1 - rate), hp["epsilon"]))
        return omega * (reward * -log_ratio + (1 - reward) * hp["neg_weight"] * negative)
    advantage = (reward - rate) / std if name in ("grpo", "dapo") else reward - rate
    clipped = min(max(ratio, 1 - hp["clip_low"]), 1 + hp["clip_high"])
    return -min(ratio * advantage, clipped * advantage)


def reference_loss(
    name: str, hp: dict, batch: PolicyBatch, token_weights: Optional[torch.Tensor] = None
) -> float:
    """The loss `name` with hyperparameters `hp` (all keys given), token by token in Python.

    `token_weights` [B, T]: rollout-correction weights; a token-level loss sums w_bt · a_bt · ℓ_bt
    (a_bt the aggregation weight, unchanged by w), InfoNCA weights each answer by the mean of its
    tokens' weights as a sample of its group."""
    rate, std = reference_group_stats(batch)
    mask, rewards = batch.mask, batch.rewards.tolist()
    lengths = [int(n) for n in mask.sum(dim=1).tolist()]
    weights_of_tokens = [[1.0] * n for n in lengths] if token_weights is None else [
        token_weights[b, :n].tolist() for b, n in enumerate(lengths)
    ]
    if name == "infonca":
        answer_weights = [sum(w) / len(w) if w else 1.0 for w in weights_of_tokens]
        log_ratio = torch.where(mask, batch.logprobs - batch.old_logprobs, 0.0).tolist()
        return reference_infonca(hp, batch, rate, log_ratio, answer_weights)
    log_ratio = reference_log_ratios(batch, hp)
    weights = aggregation_weights(mask, hp["loss_agg"], constant_normalizer=hp.get("constant_normalizer")).tolist()
    total = 0.0
    for b in range(mask.shape[0]):
        if not 0 < rate[b] < 1:
            continue
        for t in range(lengths[b]):
            token_loss = reference_token_loss(name, hp, rewards[b], rate[b], std[b], log_ratio[b][t])
            total += weights_of_tokens[b][t] * weights[b][t] * token_loss
    return total


def reference_infonca(
    hp: dict,
    batch: PolicyBatch,
    rate: list[float],
    log_ratio: list[list[float]],
    answer_weights: Optional[list[float]] = None,
) -> float:
    """Σ_q L_q / G with L_q = −Σ_k (w_k r_k / Σ_i w_i r_i)(β h_k − log Σ_i w_i e^{β h_i} + sft·mean_t log R)."""
    w = answer_weights or [1.0] * batch.mask.shape[0]
    groups: dict[int, list[int]] = {}
    for b, gid in enumerate(batch.group_ids.tolist()):
        groups.setdefault(gid, []).append(b)
    total = 0.0
    for rows in groups.values():
        positives = [b for b in rows if batch.rewards[b] == 1]
        positive_mass = sum(w[b] for b in positives)
        if not 0 < rate[rows[0]] < 1 or positive_mass == 0:
            continue
        h = {b: sum(log_ratio[b]) for b in rows}
        top = max(hp["beta"] * h[b] for b in rows if w[b] > 0)
        log_norm = top + math.log(sum(w[b] * math.exp(hp["beta"] * h[b] - top) for b in rows if w[b] > 0))
        for b in positives:
            token_mean = h[b] / max(int(batch.mask[b].sum()), 1)
            total += -w[b] * (hp["beta"] * h[b] - log_norm + hp["sft_coef"] * token_mean) / positive_mass
    return total / len(groups)


def analytic_gradient(
    name: str, hp: dict, batch: PolicyBatch, token_weights: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """∂loss/∂log π_θ from Eq. 11 (GRPO family), Eq. 12 (NFT) and RFT's −r, times the aggregation
    weight (and the token weight w_bt, if given). At a sequence ratio level each token of an answer
    gets the answer's total coefficient (÷ n for sequence_mean); above max_log_ratio, 0."""
    rate, std = (torch.tensor(v, dtype=torch.float64)[:, None] for v in reference_group_stats(batch))
    reward = batch.rewards[:, None]
    width = batch.mask.shape[1]

    def padded(rows: list[list[float]]) -> torch.Tensor:
        return torch.tensor([row + [0.0] * (width - len(row)) for row in rows], dtype=torch.float64).reshape(batch.mask.shape)

    unclamped = padded(reference_log_ratios(batch, dict(hp, max_log_ratio=None)))
    ratio = torch.exp(padded(reference_log_ratios(batch, hp)))
    informative = (rate > 0) & (rate < 1)
    safe = torch.where(informative, rate, 0.5)
    if name == "rft":
        per_token = -reward.expand_as(ratio)
    elif name == "nft":
        if hp.get("correct_rate_clip") is not None:
            safe = safe.clamp(*hp["correct_rate_clip"])
        omega = {"constant": 1.0, "dr_grpo": 1 - safe, "grpo": torch.sqrt((1 - safe) / safe)}[hp["prompt_weight"]]
        negative_ratio = (1 - safe * ratio) / (1 - safe)
        negative = hp["neg_weight"] * (safe / (1 - safe)) * ratio / negative_ratio.clamp(min=hp["epsilon"])
        per_token = omega * torch.where(reward == 1, -torch.ones_like(ratio), negative)
    else:
        advantage = (reward - safe) / std.clamp(min=1e-300) if name in ("grpo", "dapo") else reward - safe
        inside = ((advantage > 0) & (ratio < 1 + hp["clip_high"])) | ((advantage < 0) & (ratio > 1 - hp["clip_low"]))
        per_token = torch.where(inside, -advantage * ratio, 0.0)
    per_token = torch.where(informative, per_token, 0.0)
    if hp.get("max_log_ratio") is not None:
        per_token = torch.where(unclamped > hp["max_log_ratio"], 0.0, per_token)
    if token_weights is not None:
        per_token = per_token * torch.where(batch.mask, token_weights, 0.0)
    aggregation = aggregation_weights(
        batch.mask, hp["loss_agg"], hp.get("max_response_len"), hp.get("constant_normalizer")
    )
    coefficient = per_token * aggregation
    level = hp.get("ratio_level", "token")
    if level == "token":
        return coefficient
    lengths = batch.mask.sum(dim=1, keepdim=True).double()
    per_answer = coefficient.sum(dim=1, keepdim=True) / (lengths.clamp(min=1) if level == "sequence_mean" else 1)
    return torch.where(batch.mask, per_answer, 0.0)


def dpo_loss(logprobs: torch.Tensor, batch: PolicyBatch, beta: float) -> torch.Tensor:
    """−mean over pairs of log σ(β (h_w − h_l)), h = Σ_t (log π_θ − log π_old): DPO with π_ref = π_old.
    `batch` holds groups of one right and one wrong answer."""
    h = torch.where(batch.mask, logprobs - batch.old_logprobs, 0.0).sum(dim=1)
    pairs = [torch.nonzero(batch.group_ids == g).flatten() for g in batch.group_ids.unique()]
    margins = torch.stack([h[p][batch.rewards[p] == 1].sum() - h[p][batch.rewards[p] == 0].sum() for p in pairs])
    return -F.logsigmoid(beta * margins).mean()


def authors_nft_loss(
    logprobs: torch.Tensor,
    batch: PolicyBatch,
    *,
    sequence: bool = False,
    epsilon: float = 1.0,
    max_log_ratio: float = 10.0,
    correct_rate_clip: tuple[float, float] = (0.02, 0.98),
    normalizer: float = 1000.0,
) -> torch.Tensor:
    """NFT as issue 16 describes the authors' code (NVlabs/NFT), written from that description:
    scores s = ±1 and r̂ = (mean s + 1)/2 per prompt; prompts with r̂ ∈ {0, 1} dropped; r̂ clamped
    to [0.02, 0.98]; ω = 1 − r̂; log R = min(log π_θ − log π_old, 10) per token, or per answer
    min(Σ_t ·, 10) (`sequence`); positive −log R, negative −log max_v((1 − r̂R)/(1 − r̂), ε); the
    terms (tokens, or answers) summed over the batch and divided by 1000. A loop, per answer."""
    scores = (2 * batch.rewards - 1).tolist()
    members: dict[int, list[int]] = {}
    for b, gid in enumerate(batch.group_ids.tolist()):
        members.setdefault(gid, []).append(b)
    cap = torch.tensor(max_log_ratio, dtype=logprobs.dtype)
    total = torch.zeros((), dtype=logprobs.dtype)
    for rows in members.values():
        rate = (statistics.fmean(scores[b] for b in rows) + 1) / 2
        if rate in (0.0, 1.0):
            continue
        rate = min(max(rate, correct_rate_clip[0]), correct_rate_clip[1])
        omega = 1 - rate
        for b in rows:
            n = int(batch.mask[b].sum())
            token_log_ratios = logprobs[b, :n] - batch.old_logprobs[b, :n]
            units = token_log_ratios.sum().reshape(1) if sequence else token_log_ratios
            for log_ratio in torch.minimum(units, cap):
                if scores[b] > 0:
                    term = -log_ratio
                else:
                    negative_ratio = (1 - rate * torch.exp(log_ratio)) / (1 - rate)
                    kept = negative_ratio - negative_ratio.detach() + torch.clamp(negative_ratio.detach(), min=epsilon)
                    term = -torch.log(kept)
                total = total + omega * term
    return total / normalizer
