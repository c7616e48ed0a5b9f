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


def reference_group_stats(batch: PolicyBatch) -> tuple[list[float], list[float]]:
    """r̂ and population std of each row's group, from Python lists."""
    members: dict[int, list[float]] = {}
    for gid, reward in zip(batch.group_ids.tolist(), batch.rewards.tolist()):
        members.setdefault(gid, []).append(reward)
    rate = [statistics.fmean(members[g]) for g in batch.group_ids.tolist()]
    std = [statistics.pstdev(members[g]) for g in batch.group_ids.tolist()]
    return rate, std


def aggregation_weights(mask: torch.Tensor, loss_agg: str, horizon: Optional[int] = None) -> torch.Tensor:
    """w [B, T] with loss = Σ_bt w_bt ℓ_bt, from verl's definitions of the five modes."""
    rows, width = mask.shape
    m = mask.double()
    lengths = m.sum(dim=1, keepdim=True)
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


def reference_token_loss(name: str, hp: dict, reward: float, rate: float, std: float, log_ratio: float) -> float:
    ratio = math.exp(log_ratio)
    if name == "rft":
        return reward * -log_ratio
    if name == "nft":
        omega = {"constant": 1.0, "dr_grpo": 1 - rate, "grpo": math.sqrt((1 - rate) / rate)}[hp["prompt_weight"]]
        negative = -math.log(max((1 - rate * ratio) / (1 - rate), hp["epsilon"]))
        return omega * (reward * -log_ratio + (1 - reward) * hp["neg_weight"] * negative)
    advantage = (reward - rate) / std if name in ("grpo", "dapo") else reward - rate
    clipped = min(max(ratio, 1 - hp["clip_low"]), 1 + hp["clip_high"])
    return -min(ratio * advantage, clipped * advantage)


def reference_loss(name: str, hp: dict, batch: PolicyBatch) -> float:
    """The loss `name` with hyperparameters `hp` (all keys given), token by token in Python."""
    rate, std = reference_group_stats(batch)
    mask, rewards = batch.mask, batch.rewards.tolist()
    log_ratio = torch.where(mask, batch.logprobs - batch.old_logprobs, 0.0).tolist()
    if name == "infonca":
        return reference_infonca(hp, batch, rate, log_ratio)
    weights = aggregation_weights(mask, hp["loss_agg"]).tolist()
    total = 0.0
    for b in range(mask.shape[0]):
        if not 0 < rate[b] < 1:
            continue
        for t in range(int(mask[b].sum())):
            total += weights[b][t] * reference_token_loss(name, hp, rewards[b], rate[b], std[b], log_ratio[b][t])
    return total


def reference_infonca(hp: dict, batch: PolicyBatch, rate: list[float], log_ratio: list[list[float]]) -> float:
    groups: dict[int, list[int]] = {}
    for b, gid in enumerate(batch.group_ids.tolist()):
        groups.setdefault(gid, []).append(b)
    total = 0.0
    for rows in groups.values():
        if not 0 < rate[rows[0]] < 1:
            continue
        h = {b: sum(log_ratio[b]) for b in rows}
        log_norm = math.log(sum(math.exp(hp["beta"] * h[b]) for b in rows))
        positives = [b for b in rows if batch.rewards[b] == 1]
        for b in positives:
            token_mean = h[b] / max(int(batch.mask[b].sum()), 1)
            total += -(hp["beta"] * h[b] - log_norm + hp["sft_coef"] * token_mean) / len(positives)
    return total / len(groups)


def analytic_gradient(name: str, hp: dict, batch: PolicyBatch) -> torch.Tensor:
    """∂loss/∂log π_θ from Eq. 11 (GRPO family), Eq. 12 (NFT) and RFT's −r, times the aggregation weight."""
    rate, std = (torch.tensor(v, dtype=torch.float64)[:, None] for v in reference_group_stats(batch))
    reward = batch.rewards[:, None]
    ratio = torch.exp(torch.where(batch.mask, batch.logprobs - batch.old_logprobs, 0.0))
    safe = torch.where((rate > 0) & (rate < 1), rate, 0.5)
    if name == "rft":
        per_token = -reward.expand_as(ratio)
    elif name == "nft":
        omega = {"constant": 1.0, "dr_grpo": 1 - safe, "grpo": torch.sqrt((1 - safe) / safe)}[hp["prompt_weight"]]
        negative_ratio = (1 - safe * ratio) / (1 - safe)
        negative = hp["neg_weight"] * (safe / (1 - safe)) * ratio / negative_ratio.clamp(min=hp["epsilon"])
        per_token = omega * torch.where(reward == 1, -torch.ones_like(ratio), negative)
    else:
        advantage = (reward - safe) / std.clamp(min=1e-300) if name in ("grpo", "dapo") else reward - safe
        inside = ((advantage > 0) & (ratio < 1 + hp["clip_high"])) | ((advantage < 0) & (ratio > 1 - hp["clip_low"]))
        per_token = torch.where(inside, -advantage * ratio, 0.0)
    per_token = torch.where((rate > 0) & (rate < 1), per_token, 0.0)
    return per_token * aggregation_weights(batch.mask, hp["loss_agg"], hp.get("max_response_len"))


def dpo_loss(logprobs: torch.Tensor, batch: PolicyBatch, beta: float) -> torch.Tensor:
    """−mean over pairs of log σ(β (h_w − h_l)), h = Σ_t (log π_θ − log π_old): DPO with π_ref = π_old.
    `batch` holds groups of one right and one wrong answer."""
    h = torch.where(batch.mask, logprobs - batch.old_logprobs, 0.0).sum(dim=1)
    pairs = [torch.nonzero(batch.group_ids == g).flatten() for g in batch.group_ids.unique()]
    margins = torch.stack([h[p][batch.rewards[p] == 1].sum() - h[p][batch.rewards[p] == 0].sum() for p in pairs])
    return -F.logsigmoid(beta * margins).mean()
