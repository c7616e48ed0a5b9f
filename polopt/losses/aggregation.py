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
    none                  1                (token-sum)

Empty rows (n_b = 0) count as sequences and contribute 0. A denominator of 0 (no tokens at all) is
replaced by 1: the numerator is then 0 and so is the loss.
"""

from __future__ import annotations

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


def horizon(mask: torch.Tensor, max_response_len: Optional[int]) -> int:
    """L of seq-mean-token-sum-norm: `max_response_len` if set (≥ mask width), else mask width."""
    if max_response_len is None:
        return mask.shape[1]
    if mask.shape[1] > max_response_len:
        raise ValueError(
            f"mask has {mask.shape[1]} token columns, more than max_response_len={max_response_len}"
        )
    return max_response_len


def count_normalizer(
    kind: str,
    mask: torch.Tensor,
    *,
    num_groups: Optional[int] = None,
    max_response_len: Optional[int] = None,
) -> torch.Tensor:
    """The denominator of `kind` for the batch that `mask` [B, T] describes (a 0-dim tensor)."""
    if kind == "tokens":
        count = mask.sum()
    elif kind == "sequences":
        count = mask.shape[0]
    elif kind == "sequences_x_horizon":
        count = mask.shape[0] * horizon(mask, max_response_len)
    elif kind == "groups":
        if num_groups is None:
            raise ValueError("normalizer kind 'groups' needs group_ids")
        count = num_groups
    elif kind == "none":
        count = 1
    else:
        raise ValueError(f"normalizer kind must be one of {NORMALIZER_KINDS}, got {kind!r}")
    return torch.as_tensor(count, device=mask.device)


def divide(numerator: torch.Tensor, denominator: Normalizer) -> torch.Tensor:
    """numerator / denominator in the numerator's dtype, with a zero denominator read as 1."""
    denominator = torch.as_tensor(denominator, dtype=numerator.dtype, device=numerator.device)
    return numerator / torch.where(denominator > 0, denominator, torch.ones_like(denominator))


def aggregate(
    token_losses: torch.Tensor,
    mask: torch.Tensor,
    loss_agg: str,
    *,
    normalizer: Optional[Normalizer] = None,
    max_response_len: Optional[int] = None,
) -> torch.Tensor:
    """Scalar loss from ℓ [B, T] (already 0 off the mask) by `loss_agg`, see the module docstring.

    `normalizer`: the denominator of the whole batch; None means this call's batch is the whole batch.
    """
    if loss_agg == "seq-mean-token-mean":
        tokens_per_row = mask.sum(dim=-1).to(token_losses.dtype)
        numerator = (token_losses.sum(dim=-1) / tokens_per_row.clamp(min=1)).sum()
    else:
        numerator = token_losses.sum()
    if normalizer is None:
        normalizer = count_normalizer(LOSS_AGG_MODES[loss_agg], mask, max_response_len=max_response_len)
    return divide(numerator, normalizer)
