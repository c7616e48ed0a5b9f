"""Aggregation of per-token losses ℓ_bt into one scalar (verl's `loss_agg` names).

With m_bt the response mask, n_b = Σ_t m_bt, B the number of sequences and L the response horizon:

    token-mean                Σ_bt m ℓ / Σ_bt m                (DAPO; NFT, Appendix B)
    token-sum                 Σ_bt m ℓ
    seq-mean-token-mean       Σ_b (Σ_t m ℓ / n_b) / B          (GRPO, Shao et al. 2024)
    seq-mean-token-sum        Σ_b Σ_t m ℓ / B
    seq-mean-token-sum-norm   Σ_bt m ℓ / (B · L)               (Dr.GRPO, Liu et al. 2025)

Every mode is numerator / denominator where the numerator is a sum over rows. Passing the
denominator of the *whole* batch as `normalizer` makes the losses of micro-batches (or ranks) add up
to exactly the whole-batch loss and gradient. The denominators ("normalizer kinds"):

    tokens                Σ_bt m           (token-mean)
    sequences             B                (seq-mean-token-mean, seq-mean-token-sum)
    sequences_x_horizon   B · L            (seq-mean-token-sum-norm)
    groups                number of groups (InfoNCA: mean over groups)
    none                  1                (token-sum), or a token-level loss's constant C

A token-level loss's `constant_normalizer` C replaces the counted denominator by a constant of the
run: loss = (numerator of `loss_agg`) / C, i.e. Σ_bt m ℓ / C, or Σ_b (Σ_t m ℓ / n_b) / C with
seq-mean-token-mean (the NFT authors' code divides Σ_bt m ℓ by C = 1000). Its kind is "none": the
same on every micro-batch and rank, never summed, so micro-batch losses add up to the whole
batch's without any global count.

Empty rows (n_b = 0) count as sequences and contribute 0. A denominator of 0 (no tokens at all) is
replaced by 1: the numerator is then 0 and so is the loss.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch

LOSS_AGG_MODES = {
    "token-mean": "tokens",
    "token-sum": "none",
    "seq-mean-token-mean": "sequences",
    "seq-mean-token-sum": "sequences",
    "seq-mean-token-sum-norm": "sequences_x_horizon",
}
NORMALIZER_KINDS = ("tokens", "sequences", "sequences_x_horizon", "groups", "none")

Normalizer = Union[float, int, torch.Tensor]


def check_loss_agg(loss_agg: str) -> str:
    if loss_agg not in LOSS_AGG_MODES:
        raise ValueError(f"loss_agg must be one of {list(LOSS_AGG_MODES)}, got {loss_agg!r}")
    return loss_agg


def check_constant_normalizer(value) -> Optional[float]:
    """None, or a finite number > 0."""
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"constant_normalizer must be None or a number > 0, got {value!r}") from None
    if not (math.isfinite(number) and number > 0):
        raise ValueError(f"constant_normalizer must be None or a finite number > 0, got {value!r}")
    return number


def horizon(width: int, max_response_len: Optional[int]) -> int:
    """L of seq-mean-token-sum-norm: `max_response_len` if set (≥ the mask's width), else the width."""
    if max_response_len is None:
        return width
    if width > max_response_len:
        raise ValueError(f"mask has {width} token columns, more than max_response_len={max_response_len}")
    return max_response_len


def count_normalizer(
    kind: str,
    lengths: torch.Tensor,
    width: int,
    *,
    num_groups: Optional[int] = None,
    max_response_len: Optional[int] = None,
) -> torch.Tensor:
    """The denominator of `kind` for a batch of rows with `lengths` [B] tokens, padded to `width`."""
    if kind == "tokens":
        count = lengths.sum()
    elif kind == "sequences":
        count = lengths.numel()
    elif kind == "sequences_x_horizon":
        count = lengths.numel() * horizon(width, max_response_len)
    elif kind == "groups":
        if num_groups is None:
            raise ValueError("normalizer kind 'groups' needs group_ids")
        count = num_groups
    elif kind == "none":
        count = 1
    else:
        raise ValueError(f"normalizer kind must be one of {NORMALIZER_KINDS}, got {kind!r}")
    return torch.as_tensor(count, device=lengths.device)


def divide(numerator: torch.Tensor, denominator: Normalizer) -> torch.Tensor:
    """numerator / denominator in the numerator's dtype, with a zero denominator read as 1."""
    denominator = torch.as_tensor(denominator, dtype=numerator.dtype, device=numerator.device)
    return numerator / torch.where(denominator > 0, denominator, torch.ones_like(denominator))


def aggregate(
    row_sums: torch.Tensor,
    lengths: torch.Tensor,
    width: int,
    loss_agg: str,
    *,
    normalizer: Optional[Normalizer] = None,
    max_response_len: Optional[int] = None,
) -> torch.Tensor:
    """Scalar loss from the rows' Σ_t m ℓ [B] and token counts n_b [B] by `loss_agg` (module docstring).

    `normalizer`: the denominator of the whole batch; None means this call's batch is the whole batch.
    """
    if loss_agg == "seq-mean-token-mean":
        numerator = (row_sums / lengths.clamp(min=1)).sum()
    else:
        numerator = row_sums.sum()
    if normalizer is None:
        kind = LOSS_AGG_MODES[loss_agg]
        normalizer = count_normalizer(kind, lengths, width, max_response_len=max_response_len)
    return divide(numerator, normalizer)


def global_normalizer(
    loss_fn_or_loss_agg,
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
        constant_normalizer=C     → C                   (kind "none", whatever loss_agg)

    L is `max_response_len` if given here, else the loss's own `max_response_len`, else mask.shape[1]
    of this (whole) batch — micro-batches trimmed to shorter widths still divide by the same L.
    Data parallel: every kind but "none" is additive over disjoint parts of the batch (whole groups
    for "groups"), so all-reduce SUM of the per-rank values gives the global value; for "none" it
    is 1 (or C) on every rank (do not sum it).
    """
    if hasattr(loss_fn_or_loss_agg, "normalizer_kind"):  # a PolicyLoss
        kind = loss_fn_or_loss_agg.normalizer_kind
        constant = getattr(loss_fn_or_loss_agg, "constant_normalizer", None)
        if constant is not None:
            return float(constant)
        if max_response_len is None:
            max_response_len = loss_fn_or_loss_agg.max_response_len
    elif isinstance(loss_fn_or_loss_agg, str) and loss_fn_or_loss_agg in LOSS_AGG_MODES:
        kind = LOSS_AGG_MODES[loss_fn_or_loss_agg]
    else:
        raise ValueError(
            f"global_normalizer needs a PolicyLoss or a loss_agg in {list(LOSS_AGG_MODES)}, got {loss_fn_or_loss_agg!r}"
        )
    if mask.dim() != 2:
        raise ValueError(f"mask must be [B, T], got shape {list(mask.shape)}")
    num_groups = None
    if kind == "groups":
        if group_ids is None:
            raise ValueError("global_normalizer for a per-group loss (infonca) needs group_ids [B]")
        num_groups = torch.unique(group_ids).numel()
    lengths = mask.to(torch.bool).sum(dim=-1)
    return float(
        count_normalizer(kind, lengths, mask.shape[1], num_groups=num_groups, max_response_len=max_response_len).item()
    )
