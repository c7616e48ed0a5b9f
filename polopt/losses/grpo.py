"""GRPO (Shao et al. 2024): the PPO clipped surrogate with a group-normalised advantage.

    A = (r − r̂) / sqrt(r̂ (1 − r̂))        (Eq. 4: population std of binary rewards, no epsilon)
    ℓ_t = −min(R_t A, clip(R_t, 1 − ε_low, 1 + ε_high) A)                             (Eq. 3)

`clip_low`/`clip_high` are ε_low/ε_high. The gradient is −A ∇R_t inside the clip region and 0
outside it (Eq. 11). Default aggregation: mean over each sequence's tokens, then over sequences
(`seq-mean-token-mean`), as in the GRPO paper.
"""

from __future__ import annotations

from typing import Optional

import torch

from polopt.losses.base import LossInputs, TokenLevelLoss, check_number
from polopt.losses.group_stats import grpo_advantage
from polopt.losses.ratios import likelihood_ratio
from polopt.losses.registry import register_loss


@register_loss("grpo")
class GRPOLoss(TokenLevelLoss):
    def __init__(
        self,
        clip_low: float = 0.2,
        clip_high: float = 0.2,
        loss_agg: str = "seq-mean-token-mean",
        max_response_len: Optional[int] = None,
        kl_coef: float = 0.0,
    ) -> None:
        super().__init__(loss_agg, max_response_len, kl_coef)
        self.clip_low = check_number("clip_low", clip_low, low=0.0, high=1.0)
        self.clip_high = check_number("clip_high", clip_high, low=0.0, high=1.0)

    def advantages(self, inputs: LossInputs) -> torch.Tensor:
        return grpo_advantage(inputs.rewards, inputs.correct_rate)

    def token_losses(self, inputs: LossInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        advantage = self.advantages(inputs)[:, None]
        ratio = likelihood_ratio(inputs.log_ratio)
        clipped_ratio = ratio.clamp(1 - self.clip_low, 1 + self.clip_high)
        token_losses = -torch.minimum(ratio * advantage, clipped_ratio * advantage)

        # Tokens whose gradient the clip zeroes (Eq. 11): A > 0 above 1 + ε_high, A < 0 below 1 − ε_low.
        tokens = inputs.mask & inputs.informative[:, None]
        count = tokens.sum().clamp(min=1)
        clipped_high = tokens & (advantage > 0) & (ratio.detach() > 1 + self.clip_high)
        clipped_low = tokens & (advantage < 0) & (ratio.detach() < 1 - self.clip_low)
        metrics = {
            "clip_frac": (clipped_high | clipped_low).sum() / count,
            "clip_frac_high": clipped_high.sum() / count,
            "clip_frac_low": clipped_low.sum() / count,
        }
        return token_losses, metrics
