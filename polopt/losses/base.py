"""The loss contract: `PolicyLoss`, its validated inputs, its output, and `global_normalizer`.

    out = loss_fn(logprobs, old_logprobs, mask, rewards, group_ids,
                  correct_rate=None, normalizer=None, ref_logprobs=None)

    logprobs      [B, T]  log π_θ(a_t | q, a_<t), with grad
    old_logprobs  [B, T]  log π_old of the sampling policy
    mask          [B, T]  response tokens (bool or 0/1)
    rewards       [B]     0/1 verifier rewards
    group_ids     [B]     equal for the answers to one prompt
    correct_rate  [B]     r̂ of each row's group over the WHOLE group; default: computed from the rows
                          given, which is right only when every group is whole in this call
    normalizer            the whole batch's denominator (see aggregation.py) for micro-batches/ranks
    ref_logprobs  [B, T]  log π_ref, needed only when kl_coef > 0

Loss math runs in fp32, or in the inputs' dtype if wider.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import ClassVar, Optional, Union

import torch
from torch import nn

from polopt.losses.aggregation import (
    LOSS_AGG_MODES,
    Normalizer,
    aggregate,
    check_loss_agg,
    count_normalizer,
)
from polopt.losses.group_stats import group_correct_rate, group_index, informative
from polopt.losses.ratios import k3_kl, likelihood_ratio, masked_log_ratio


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar, to backward
    metrics: dict[str, float]


@dataclass
class LossInputs:
    """Validated inputs in the compute dtype; `log_ratio` is 0 on padding."""

    logprobs: torch.Tensor
    old_logprobs: torch.Tensor
    mask: torch.Tensor  # bool [B, T]
    rewards: torch.Tensor  # [B], compute dtype
    group_ids: torch.Tensor
    correct_rate: torch.Tensor  # [B], compute dtype
    log_ratio: torch.Tensor
    ref_logprobs: Optional[torch.Tensor]

    @property
    def positive(self) -> torch.Tensor:
        return self.rewards == 1

    @property
    def informative(self) -> torch.Tensor:
        return informative(self.correct_rate)


def check_number(name: str, value, *, low: float, high: float = math.inf, low_open: bool = True) -> float:
    """`value` as a float above `low` (strictly if low_open) and below `high`, or a ValueError."""
    if high == math.inf:
        expected = f"> {low:g}" if low_open else f">= {low:g}"
    else:
        expected = f"in {'(' if low_open else '['}{low:g}, {high:g})"
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number {expected}, got {value!r}") from None
    above_low = number > low if low_open else number >= low
    if not (above_low and number < high):  # also rejects NaN
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return number


def check_max_response_len(value: Optional[int]) -> Optional[int]:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"max_response_len must be None or an int >= 1, got {value!r}")
    return value


def _shape(tensor: torch.Tensor) -> list[int]:
    return list(tensor.shape)


def prepare_inputs(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    mask: torch.Tensor,
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    correct_rate: Optional[torch.Tensor],
    normalizer: Optional[Normalizer],
    ref_logprobs: Optional[torch.Tensor],
) -> LossInputs:
    """Check shapes and values (one device sync for all value checks) and cast to the compute dtype."""
    tensors = dict(logprobs=logprobs, old_logprobs=old_logprobs, mask=mask, rewards=rewards, group_ids=group_ids)
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if logprobs.dim() != 2 or not logprobs.is_floating_point():
        raise ValueError(f"logprobs must be a floating-point [B, T] tensor, got {logprobs.dtype} {_shape(logprobs)}")
    batch, width = logprobs.shape
    for name, tensor in (("old_logprobs", old_logprobs), ("mask", mask), ("ref_logprobs", ref_logprobs)):
        if tensor is not None and tensor.shape != logprobs.shape:
            raise ValueError(f"{name} must have the shape of logprobs {[batch, width]}, got {_shape(tensor)}")
    for name, tensor in (("rewards", rewards), ("group_ids", group_ids), ("correct_rate", correct_rate)):
        if tensor is not None and tensor.shape != (batch,):
            raise ValueError(f"{name} must have shape [B] = [{batch}] (one per row of logprobs), got {_shape(tensor)}")

    dtype = torch.promote_types(logprobs.dtype, torch.float32)
    device = logprobs.device
    rewards = rewards.to(device=device, dtype=dtype)
    group_ids = group_ids.to(device)
    bool_mask = mask.to(device=device, dtype=torch.bool)
    if correct_rate is None:
        correct_rate = group_correct_rate(rewards, group_ids)
    correct_rate = correct_rate.to(device=device, dtype=dtype)

    check_values(rewards, mask.to(device), correct_rate, normalizer)

    logprobs, old_logprobs = logprobs.to(dtype), old_logprobs.to(device=device, dtype=dtype)
    if ref_logprobs is not None:
        ref_logprobs = ref_logprobs.to(device=device, dtype=dtype)
    return LossInputs(
        logprobs=logprobs,
        old_logprobs=old_logprobs,
        mask=bool_mask,
        rewards=rewards,
        group_ids=group_ids,
        correct_rate=correct_rate,
        log_ratio=masked_log_ratio(logprobs, old_logprobs, bool_mask),
        ref_logprobs=ref_logprobs,
    )


def check_values(
    rewards: torch.Tensor, mask: torch.Tensor, correct_rate: torch.Tensor, normalizer: Optional[Normalizer]
) -> None:
    """Value checks that need the data; one device sync for all of them (more only on failure)."""
    checks = [
        ("rewards", rewards, (rewards != 0) & (rewards != 1), "must be 0 or 1"),
        ("correct_rate", correct_rate, ~((correct_rate >= 0) & (correct_rate <= 1)), "must be in [0, 1]"),
        (
            "correct_rate",
            correct_rate,
            ((rewards == 1) & (correct_rate == 0)) | ((rewards == 0) & (correct_rate == 1)),
            "must be > 0 on rows with reward 1 and < 1 on rows with reward 0",
        ),
    ]
    if mask.dtype != torch.bool:
        checks.append(("mask", mask, (mask != 0) & (mask != 1), "must be bool or 0/1"))
    if normalizer is not None:
        value = torch.as_tensor(normalizer, dtype=torch.float64).to(rewards.device)
        checks.append(("normalizer", value, ~(torch.isfinite(value) & (value >= 0)), "must be a finite number >= 0"))
    failed = torch.stack([bad.any() for _, _, bad, _ in checks]).tolist()
    for (name, given, bad, expected), has_failed in zip(checks, failed):
        if has_failed:
            where = f" at {bad.nonzero()[:5].tolist()}" if bad.dim() > 0 else ""
            raise ValueError(f"{name} {expected}, got {given[bad][:5].tolist()}{where}")


class PolicyLoss(nn.Module):
    """Base of every registered loss. Subclasses implement `compute`; `forward` is the contract.

    `normalizer_kind` ∈ {"tokens", "sequences", "sequences_x_horizon", "groups", "none"} names the
    denominator the loss divides by (aggregation.py); `global_normalizer` computes it for a batch.
    """

    name: ClassVar[str] = ""
    normalizer_kind: str = "none"
    max_response_len: Optional[int] = None
    kl_coef: float = 0.0

    def forward(
        self,
        logprobs: torch.Tensor,
        old_logprobs: torch.Tensor,
        mask: torch.Tensor,
        rewards: torch.Tensor,
        group_ids: torch.Tensor,
        *,
        correct_rate: Optional[torch.Tensor] = None,
        normalizer: Optional[Normalizer] = None,
        ref_logprobs: Optional[torch.Tensor] = None,
    ) -> LossOutput:
        if self.kl_coef > 0 and ref_logprobs is None:
            raise ValueError(f"{self.name} with kl_coef={self.kl_coef} needs ref_logprobs [B, T]")
        inputs = prepare_inputs(
            logprobs, old_logprobs, mask, rewards, group_ids, correct_rate, normalizer, ref_logprobs
        )
        loss, metrics = self.compute(inputs, normalizer)
        metrics.update(ratio_metrics(inputs))
        return LossOutput(loss=loss, metrics=to_floats(metrics))

    def compute(
        self, inputs: LossInputs, normalizer: Optional[Normalizer]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def extra_repr(self) -> str:
        names = [p for p in inspect.signature(type(self).__init__).parameters if p != "self"]
        return ", ".join(f"{name}={getattr(self, name)!r}" for name in names if hasattr(self, name))


class TokenLevelLoss(PolicyLoss):
    """A loss that is a per-token term ℓ_bt aggregated by `loss_agg`, plus an optional k3 KL term.

    Subclasses implement `token_losses`; rows of groups with r̂ ∈ {0, 1} and padding are set to
    exactly 0 here, with torch.where, so neither value nor gradient can pick up 0·inf.
    """

    def __init__(self, loss_agg: str, max_response_len: Optional[int] = None, kl_coef: float = 0.0) -> None:
        super().__init__()
        self.loss_agg = check_loss_agg(loss_agg)
        self.max_response_len = check_max_response_len(max_response_len)
        self.kl_coef = check_number("kl_coef", kl_coef, low=0.0, low_open=False)

    @property
    def normalizer_kind(self) -> str:  # type: ignore[override]
        return LOSS_AGG_MODES[self.loss_agg]

    def token_losses(self, inputs: LossInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """ℓ [B, T] (finite everywhere; masked by the caller) and loss-specific metrics."""
        raise NotImplementedError

    def compute(self, inputs, normalizer):
        token_losses, metrics = self.token_losses(inputs)
        keep = inputs.mask & inputs.informative[:, None]
        token_losses = torch.where(keep, token_losses, torch.zeros_like(token_losses))
        if self.kl_coef > 0:
            kl = torch.where(inputs.mask, k3_kl(inputs.logprobs, inputs.ref_logprobs, inputs.mask), 0.0)
            token_losses = token_losses + self.kl_coef * kl
            metrics["kl"] = kl.detach().sum() / inputs.mask.sum().clamp(min=1)
        loss = aggregate(
            token_losses, inputs.mask, self.loss_agg, normalizer=normalizer, max_response_len=self.max_response_len
        )
        return loss, metrics


def ratio_metrics(inputs: LossInputs) -> dict[str, torch.Tensor]:
    """Likelihood-ratio statistics over response tokens (0 when there are none) and token counts."""
    with torch.no_grad():
        mask = inputs.mask
        ratio = likelihood_ratio(inputs.log_ratio)
        tokens = mask.sum()
        has_tokens = tokens > 0
        zero = torch.zeros((), dtype=ratio.dtype, device=ratio.device)
        positive_rows = inputs.positive[:, None]
        return {
            "ratio_mean": torch.where(mask, ratio, 0).sum() / tokens.clamp(min=1),
            "ratio_min": torch.where(has_tokens, torch.where(mask, ratio, math.inf).min(), zero),
            "ratio_max": torch.where(has_tokens, torch.where(mask, ratio, -math.inf).max(), zero),
            "pos_tokens": (mask & positive_rows).sum(),
            "neg_tokens": (mask & ~positive_rows).sum(),
            "informative_frac": inputs.informative.sum() / max(mask.shape[0], 1),
        }


def to_floats(metrics: dict[str, torch.Tensor]) -> dict[str, float]:
    """One device sync for all metrics."""
    if not metrics:
        return {}
    values = torch.stack([torch.as_tensor(v).detach().to(torch.float64).reshape(()).cpu() for v in metrics.values()])
    return dict(zip(metrics, values.tolist()))


def global_normalizer(
    loss_fn_or_loss_agg: Union[PolicyLoss, str],
    mask: torch.Tensor,
    group_ids: Optional[torch.Tensor] = None,
    *,
    max_response_len: Optional[int] = None,
) -> float:
    """The denominator of the whole batch described by `mask` [B, T] (and `group_ids` [B]).

    Pass it as `normalizer=` to the loss of every micro-batch of that batch: the micro-batch losses
    then sum to exactly the whole-batch loss, and so do their gradients.

        token-mean                → Σ mask              (kind "tokens")
        seq-mean-token-mean/-sum  → B                   (kind "sequences")
        seq-mean-token-sum-norm   → B · L               (kind "sequences_x_horizon"; L below)
        infonca                   → number of groups    (kind "groups"; needs group_ids)
        token-sum                 → 1                   (kind "none")

    L is `max_response_len` if given here, else the loss's own `max_response_len`, else mask.shape[1]
    of this (whole) batch — micro-batches trimmed to shorter widths still divide by the same L.
    Data parallel: every kind but "none" is additive over disjoint parts of the batch (whole groups
    for "groups"), so all-reduce SUM of the per-rank values gives the global value; for "none" it
    is 1 on every rank (do not sum it).
    """
    if isinstance(loss_fn_or_loss_agg, PolicyLoss):
        kind = loss_fn_or_loss_agg.normalizer_kind
        if max_response_len is None:
            max_response_len = loss_fn_or_loss_agg.max_response_len
    elif isinstance(loss_fn_or_loss_agg, str) and loss_fn_or_loss_agg in LOSS_AGG_MODES:
        kind = LOSS_AGG_MODES[loss_fn_or_loss_agg]
    else:
        raise ValueError(
            f"global_normalizer needs a PolicyLoss or a loss_agg in {list(LOSS_AGG_MODES)}, got {loss_fn_or_loss_agg!r}"
        )
    if mask.dim() != 2:
        raise ValueError(f"mask must be [B, T], got shape {_shape(mask)}")
    num_groups = None
    if kind == "groups":
        if group_ids is None:
            raise ValueError("global_normalizer for a per-group loss (infonca) needs group_ids [B]")
        num_groups = group_index(group_ids)[1]
    return float(
        count_normalizer(kind, mask.to(torch.bool), num_groups=num_groups, max_response_len=max_response_len).item()
    )
