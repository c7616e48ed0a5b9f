"""Validated loss inputs: shape and value checks, and the cast to the compute dtype.

Loss math runs in fp32, or in the inputs' dtype if wider. Errors name the argument, what was
expected and what was given.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from polopt.losses.aggregation import Normalizer
from polopt.losses.group_stats import group_correct_rate, informative
from polopt.losses.ratios import masked_log_ratio


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
    lengths: torch.Tensor  # [B] response tokens per row
    float_mask: torch.Tensor  # mask as 0/1 in the compute dtype
    token_weights: Optional[torch.Tensor] = None  # [B, T] detached, compute dtype, 0 on padding

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
    token_weights: Optional[torch.Tensor] = None,
) -> LossInputs:
    """Check shapes and values (one device sync for all value checks) and cast to the compute dtype."""
    tensors = dict(logprobs=logprobs, old_logprobs=old_logprobs, mask=mask, rewards=rewards, group_ids=group_ids)
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if logprobs.dim() != 2 or not logprobs.is_floating_point():
        raise ValueError(f"logprobs must be a floating-point [B, T] tensor, got {logprobs.dtype} {_shape(logprobs)}")
    batch, width = logprobs.shape
    if token_weights is not None and not (isinstance(token_weights, torch.Tensor) and token_weights.is_floating_point()):
        given = token_weights.dtype if isinstance(token_weights, torch.Tensor) else type(token_weights).__name__
        raise TypeError(f"token_weights must be None or a floating-point torch.Tensor [B, T], got {given}")
    for name, tensor in (
        ("old_logprobs", old_logprobs),
        ("mask", mask),
        ("ref_logprobs", ref_logprobs),
        ("token_weights", token_weights),
    ):
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
    if token_weights is not None:
        # Constants of the loss (no gradient flows into them); padding may hold anything.
        token_weights = torch.where(bool_mask, token_weights.detach().to(device=device, dtype=dtype), 0.0)

    check_values(rewards, mask.to(device), correct_rate, normalizer, token_weights)

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
        lengths=torch.count_nonzero(bool_mask, dim=-1),
        float_mask=bool_mask.to(dtype),
        token_weights=token_weights,
    )


def check_values(
    rewards: torch.Tensor,
    mask: torch.Tensor,
    correct_rate: torch.Tensor,
    normalizer: Optional[Normalizer],
    token_weights: Optional[torch.Tensor] = None,
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
    if token_weights is not None:  # already 0 on padding
        bad_weights = ~(torch.isfinite(token_weights) & (token_weights >= 0))
        checks.append(("token_weights", token_weights, bad_weights, "must be finite and >= 0 on response tokens"))
    failed = torch.stack([bad.any() for _, _, bad, _ in checks]).tolist()
    for (name, given, bad, expected), has_failed in zip(checks, failed):
        if has_failed:
            where = f" at {bad.nonzero()[:5].tolist()}" if bad.dim() > 0 else ""
            raise ValueError(f"{name} {expected}, got {given[bad][:5].tolist()}{where}")
