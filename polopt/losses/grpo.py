"""GRPO (Shao et al. 2024): the PPO clipped surrogate with a group-normalised advantage.

    A = (r − r̂) / sqrt(r̂ (1 − r̂))        (Eq. 4: population std of binary rewards, no epsilon)
    ℓ_t = −min(R_t A, clip(R_t, 1 − ε_low, 1 + ε_high) A)                             (Eq. 3)
        = −A · min(R_t, 1 + ε_high)  if A > 0,   −A · max(R_t, 1 − ε_low)  if A < 0

`clip_low`/`clip_high` are ε_low/ε_high. The gradient is −A ∇R_t inside the clip region and 0
outside it (Eq. 11). `clip_frac` (= `clip_frac_high` + `clip_frac_low`) is the fraction of tokens,
in groups with signal, whose R is past the clip boundary by more than ratios.CLIP_COUNT_MARGIN.
Default aggregation: mean over each sequence's tokens, then over sequences (`seq-mean-token-mean`),
as in the GRPO paper.

Options shared with NFT (ratios.py, aggregation.py): `ratio_level` ("sequence_mean" with
`seq-mean-token-mean` is GSPO, Zheng et al. 2025: s = exp(mean_t log R_t), clipped per answer),
`max_log_ratio` (plain clamp of log R above), `constant_normalizer` (a fixed denominator); and
`max_response_len`, `kl_coef` (base.py).
"""

from __future__ import annotations

import torch

from polopt.losses.base import TokenLevelLoss
from polopt.losses.inputs import LossInputs, check_number
from polopt.losses.group_stats import grpo_advantage
from polopt.losses.ratios import likelihood_ratio, past_lower, past_upper
from polopt.losses.registry import register_loss


@register_loss("grpo")
class GRPOLoss(TokenLevelLoss):
    progress_metric = "clip_frac"

    def __init__(
        self, clip_low: float = 0.2, clip_high: float = 0.2, loss_agg: str = "seq-mean-token-mean", **options
    ) -> None:
        super().__init__(loss_agg, **options)
        self.clip_low = check_number("clip_low", clip_low, low=0.0, high=1.0)
        self.clip_high = check_number("clip_high", clip_high, low=0.0, high=1.0)

    def advantages(self, inputs: LossInputs) -> torch.Tensor:
        return grpo_advantage(inputs.rewards, inputs.correct_rate)

    def token_losses(self, inputs: LossInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        advantage = self.advantages(inputs)[:, None]
        ratio = likelihood_ratio(inputs.log_ratio)
        # min(R A, clip(R) A) = A·min(R, 1 + ε_high) for A > 0 and A·max(R, 1 − ε_low) for A < 0:
        # a one-sided clip per row, whose gradient is Eq. 11's indicator.
        lower = torch.full_like(advantage, -torch.inf).masked_fill(advantage < 0, 1 - self.clip_low)
        upper = torch.full_like(advantage, torch.inf).masked_fill(advantage > 0, 1 + self.clip_high)
        token_losses = -advantage * torch.clamp(ratio, lower, upper)

        # Fraction of tokens (in groups with signal) whose gradient the clip zeroes: those past the
        # bound by more than CLIP_COUNT_MARGIN (ratios.py), as NFT's neg_clip_frac counts.
        rows = inputs.informative
        clipped_high = torch.count_nonzero(past_upper(ratio, upper) & inputs.mask, dim=-1)
        clipped_low = torch.count_nonzero(past_lower(ratio, lower) & inputs.mask, dim=-1)
        tokens = torch.where(rows, inputs.lengths, 0).sum().clamp(min=1)
        metrics = {
            "clip_frac_high": torch.where(rows, clipped_high, 0).sum() / tokens,
            "clip_frac_low": torch.where(rows, clipped_low, 0).sum() / tokens,
        }
        metrics["clip_frac"] = metrics["clip_frac_high"] + metrics["clip_frac_low"]
        return token_losses, metrics
