"""Group statistics of binary rewards: correct rate, prompt weights ω(q), group advantages.

With rewards in {0, 1} every statistic of a group of K answers follows from its correct rate

    r̂_q = mean{r_1:K}                                          (Algorithm 1, line 7)
    mean{r_1:K} = r̂_q,   std{r_1:K} = sqrt(r̂_q (1 − r̂_q))      (population std, Eq. 4)

Groups with r̂_q ∈ {0, 1} carry no signal (Algorithm 1, line 8 filters them). Formulas that would
divide by zero there are evaluated at a placeholder r̂ = ½ (`safe_correct_rate`) and the rows are
masked out afterwards with torch.where — never multiplied by 0, which would turn 0·inf into NaN in
the value or the gradient.
"""

from __future__ import annotations

from typing import Optional

import torch

PROMPT_WEIGHTS = ("constant", "dr_grpo", "grpo")


def group_index(group_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Dense group index in [0, G) of every row, and the number of groups G."""
    unique, inverse = torch.unique(group_ids, return_inverse=True)
    return inverse, unique.numel()


def group_correct_rate(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """r̂ of each row's group over the rows present: [B] → [B] (float; rewards' dtype if floating)."""
    if rewards.dim() != 1 or group_ids.shape != rewards.shape:
        raise ValueError(
            f"rewards and group_ids must both have shape [B], got rewards {list(rewards.shape)} "
            f"and group_ids {list(group_ids.shape)}"
        )
    dtype = rewards.dtype if rewards.is_floating_point() else torch.float32
    index, num_groups = group_index(group_ids.to(rewards.device))
    sums = torch.zeros(num_groups, dtype=dtype, device=rewards.device).index_add_(0, index, rewards.to(dtype))
    counts = torch.bincount(index, minlength=num_groups).to(dtype)
    return (sums / counts)[index]


def informative(correct_rate: torch.Tensor) -> torch.Tensor:
    """Rows whose group has 0 < r̂ < 1: the only rows that contribute to any loss."""
    return (correct_rate > 0) & (correct_rate < 1)


def safe_correct_rate(correct_rate: torch.Tensor) -> torch.Tensor:
    """r̂ where informative, ½ elsewhere: keeps 1/r̂ and 1/(1 − r̂) finite on rows masked later."""
    return torch.where(informative(correct_rate), correct_rate, torch.full_like(correct_rate, 0.5))


def check_correct_rate_clip(bounds) -> Optional[tuple[float, float]]:
    """None, or (low, high) with 0 <= low < high <= 1 (a list from a config is fine)."""
    if bounds is None:
        return None
    try:
        low, high = (float(b) for b in bounds)
    except (TypeError, ValueError):
        raise ValueError(f"correct_rate_clip must be None or [low, high], got {bounds!r}") from None
    if not 0 <= low < high <= 1:
        raise ValueError(f"correct_rate_clip must be [low, high] with 0 <= low < high <= 1, got {bounds!r}")
    return (low, high)


def clip_correct_rate(correct_rate: torch.Tensor, bounds: Optional[tuple[float, float]]) -> torch.Tensor:
    """r̂ clamped to [low, high] where the loss uses it (not for deciding which groups carry signal)."""
    return correct_rate if bounds is None else correct_rate.clamp(*bounds)


def prompt_weight(correct_rate: torch.Tensor, kind: str) -> torch.Tensor:
    """ω(q) of Eq. 10 (choices of Sec. 5.4): 1, 1 − r̂ (≡ Dr.GRPO), or sqrt((1 − r̂)/r̂) (≡ GRPO).

    Finite on every row; rows with r̂ ∈ {0, 1} get a placeholder and must be masked by the caller.
    """
    r = safe_correct_rate(correct_rate)
    if kind == "constant":
        return torch.ones_like(r)
    if kind == "dr_grpo":
        return 1 - r
    if kind == "grpo":
        return torch.sqrt((1 - r) / r)
    raise ValueError(f"prompt_weight must be one of {PROMPT_WEIGHTS}, got {kind!r}")


def grpo_advantage(rewards: torch.Tensor, correct_rate: torch.Tensor) -> torch.Tensor:
    """A = (r − r̂) / sqrt(r̂ (1 − r̂)) (Eq. 4, population std, no epsilon); 0 where r̂ ∈ {0, 1}."""
    r = safe_correct_rate(correct_rate)
    advantage = (rewards - r) / torch.sqrt(r * (1 - r))
    return torch.where(informative(correct_rate), advantage, torch.zeros_like(advantage))


def dr_grpo_advantage(rewards: torch.Tensor, correct_rate: torch.Tensor) -> torch.Tensor:
    """A = r − r̂ (Eq. 4 without the std; Dr.GRPO, Remark A.3); 0 where r̂ ∈ {0, 1}."""
    advantage = rewards - correct_rate
    return torch.where(informative(correct_rate), advantage, torch.zeros_like(advantage))
