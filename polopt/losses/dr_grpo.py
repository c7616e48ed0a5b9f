"""Dr. GRPO (Liu et al. 2025): GRPO without the std in the advantage and without the
per-sequence length normalisation.

    A = r − r̂                                  (Eq. 4 without the std; Remark A.3)
    ℓ_t = −min(R_t A, clip(R_t, 1 − ε_low, 1 + ε_high) A)                             (Eq. 3)
    loss = Σ_bt m ℓ / (B · L)                   (`seq-mean-token-sum-norm`, L = response horizon)

Set `max_response_len` to the generation budget to make L a constant of the run (default: the
mask's width).
"""

from __future__ import annotations

import torch

from polopt.losses.inputs import LossInputs
from polopt.losses.group_stats import dr_grpo_advantage
from polopt.losses.grpo import GRPOLoss
from polopt.losses.registry import register_loss


@register_loss("dr_grpo")
class DrGRPOLoss(GRPOLoss):
    def __init__(
        self, clip_low: float = 0.2, clip_high: float = 0.2, loss_agg: str = "seq-mean-token-sum-norm", **options
    ) -> None:
        super().__init__(clip_low, clip_high, loss_agg, **options)

    def advantages(self, inputs: LossInputs) -> torch.Tensor:
        return dr_grpo_advantage(inputs.rewards, inputs.correct_rate)
