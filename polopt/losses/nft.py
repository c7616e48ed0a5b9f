"""NFT — Negative-aware Fine-Tuning (Chen et al. 2025), paper Eq. 10 and Algorithm 1.

    R_t = π_θ(a_t | q, a_<t) / π_old(a_t | q, a_<t)                 (positive likelihood ratio)
    ℓ_t = ω(q) · [ r · (−log R_t)
                   + (1 − r) · neg_weight · (−log max_v((1 − r̂ R_t) / (1 − r̂), ε)) ]   (Eq. 10)

(1 − r̂ R_t)/(1 − r̂) is the implicit negative policy's likelihood ratio (Eq. 7, Algorithm 1 line
14); max_v clips its value at ε and keeps its gradient (line 15). ω(q) (`prompt_weight`, Sec. 5.4):
"constant" 1, "dr_grpo" 1 − r̂ (on-policy ∇ ≡ Dr.GRPO, Remark A.3), "grpo" sqrt((1 − r̂)/r̂)
(on-policy ∇ ≡ GRPO for ε ≤ 1, Prop. 4.2). Off-policy, ∂ℓ_t/∂R_t of a negative token is
ω · neg_weight · r̂/(1 − r̂) / max((1 − r̂ R_t)/(1 − r̂), ε) (Eq. 12; with ω = grpo, ω·r̂/(1 − r̂) = −A⁻).
The loss is 0 at π_θ = π_old when ε ≤ 1.
Defaults follow Appendix B: ε = 1, ω = 1 − r̂, token-level normalisation (`token-mean`).
"""

from __future__ import annotations

from typing import Optional

import torch

from polopt.losses.base import TokenLevelLoss
from polopt.losses.inputs import LossInputs, check_number
from polopt.losses.group_stats import PROMPT_WEIGHTS, prompt_weight, safe_correct_rate
from polopt.losses.ratios import likelihood_ratio, max_v
from polopt.losses.registry import register_loss


@register_loss("nft")
class NFTLoss(TokenLevelLoss):
    progress_metric = "neg_clip_frac"

    def __init__(
        self,
        epsilon: float = 1.0,
        prompt_weight: str = "dr_grpo",
        neg_weight: float = 1.0,
        loss_agg: str = "token-mean",
        max_response_len: Optional[int] = None,
        kl_coef: float = 0.0,
    ) -> None:
        super().__init__(loss_agg, max_response_len, kl_coef)
        self.epsilon = check_number("epsilon", epsilon, low=0.0)
        if prompt_weight not in PROMPT_WEIGHTS:
            raise ValueError(f"prompt_weight must be one of {PROMPT_WEIGHTS}, got {prompt_weight!r}")
        self.prompt_weight = prompt_weight
        self.neg_weight = check_number("neg_weight", neg_weight, low=0.0, low_open=False)

    def token_losses(self, inputs: LossInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        correct_rate = safe_correct_rate(inputs.correct_rate)[:, None]
        weight = prompt_weight(inputs.correct_rate, self.prompt_weight)[:, None]
        positive = inputs.positive[:, None]
        negative_ratio = (1 - correct_rate * likelihood_ratio(inputs.log_ratio)) / (1 - correct_rate)
        positive_term = -inputs.log_ratio
        negative_term = -torch.log(max_v(negative_ratio, self.epsilon))
        if self.neg_weight != 1.0:
            negative_term = self.neg_weight * negative_term
        token_losses = weight * torch.where(positive, positive_term, negative_term)

        # Fraction of negative tokens (in groups with signal) whose ratio max_v clips at ε.
        negative_rows = ~inputs.positive & inputs.informative
        clipped_per_row = torch.count_nonzero((negative_ratio.detach() < self.epsilon) & inputs.mask, dim=-1)
        clipped = torch.where(negative_rows, clipped_per_row, 0).sum()
        negative_tokens = torch.where(negative_rows, inputs.lengths, 0).sum()
        return token_losses, {"neg_clip_frac": clipped / negative_tokens.clamp(min=1)}
