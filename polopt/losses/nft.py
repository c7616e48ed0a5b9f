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
`neg_clip_frac`: the fraction of negative tokens, in groups with signal, where max_v is active —
x(R) = (1 − r̂R)/(1 − r̂) < ε, i.e. R > R_ε = (1 − ε(1 − r̂))/r̂ — counted only where R exceeds R_ε
by more than ratios.CLIP_COUNT_MARGIN. With ε = 1, R_ε = 1: on-policy (R = 1 up to the rounding
of two forward passes) nothing is clipped, and an exact test x < ε would count the rounding of
about half the tokens. With ε > 1 every negative token is clipped on-policy (x(1) = 1 < ε), as
it is in value.
Defaults follow Appendix B: ε = 1, ω = 1 − r̂, token-level normalisation (`token-mean`).

Options (defaults keep the equation above; the NFT authors' code, NVlabs/NFT, uses the values in
brackets — docs/losses.md lists every difference):
    ratio_level          "token" | "sequence_sum" | "sequence_mean": R_t of one token, or one ratio
                         per answer, exp Σ_t log R_t (Eq. 9, the authors' sequence mode) or
                         exp mean_t log R_t (ratios.py)                                 ["token"]
    max_log_ratio        c: log R ← min(log R, c), a plain clamp (zero gradient above c)     [10]
    correct_rate_clip    [lo, hi]: r̂ ← clamp(r̂, lo, hi) in the negative ratio and in ω(q); which
                         groups carry signal is still decided by the unclipped r̂   [[0.02, 0.98]]
    constant_normalizer  C: loss = Σ_bt m ℓ / C (with a Σ_bt loss_agg, e.g. token-sum)   [1000]
and `max_response_len`, `kl_coef` (base.py).
"""

from __future__ import annotations

from typing import Optional

import torch

from polopt.losses.base import TokenLevelLoss
from polopt.losses.inputs import LossInputs, check_number
from polopt.losses.group_stats import (
    PROMPT_WEIGHTS,
    check_correct_rate_clip,
    clip_correct_rate,
    prompt_weight,
    safe_correct_rate,
)
from polopt.losses.ratios import likelihood_ratio, max_v, past_upper
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
        *,
        correct_rate_clip: Optional[tuple[float, float]] = None,
        **options,
    ) -> None:
        super().__init__(loss_agg, **options)
        self.correct_rate_clip = check_correct_rate_clip(correct_rate_clip)
        self.epsilon = check_number("epsilon", epsilon, low=0.0)
        if prompt_weight not in PROMPT_WEIGHTS:
            raise ValueError(f"prompt_weight must be one of {PROMPT_WEIGHTS}, got {prompt_weight!r}")
        self.prompt_weight = prompt_weight
        self.neg_weight = check_number("neg_weight", neg_weight, low=0.0, low_open=False)

    def token_losses(self, inputs: LossInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        clipped_rate = clip_correct_rate(inputs.correct_rate, self.correct_rate_clip)
        correct_rate = safe_correct_rate(clipped_rate)[:, None]
        weight = prompt_weight(clipped_rate, self.prompt_weight)[:, None]
        positive = inputs.positive[:, None]
        ratio = likelihood_ratio(inputs.log_ratio)
        negative_ratio = (1 - correct_rate * ratio) / (1 - correct_rate)
        positive_term = -inputs.log_ratio
        negative_term = -torch.log(max_v(negative_ratio, self.epsilon))
        if self.neg_weight != 1.0:
            negative_term = self.neg_weight * negative_term
        token_losses = weight * torch.where(positive, positive_term, negative_term)

        # Fraction of negative tokens (in groups with signal) whose ratio max_v clips at ε: x(R) < ε
        # exactly where R > R_ε = (1 − ε(1 − r̂))/r̂ (x falls as R grows); counted past R_ε by more
        # than CLIP_COUNT_MARGIN (ratios.py), so that on-policy rounding around R_ε = 1 (ε = 1) is not.
        negative_rows = ~inputs.positive & inputs.informative
        clip_boundary = (1 - self.epsilon * (1 - correct_rate)) / correct_rate
        clipped_per_row = torch.count_nonzero(past_upper(ratio, clip_boundary) & inputs.mask, dim=-1)
        clipped = torch.where(negative_rows, clipped_per_row, 0).sum()
        negative_tokens = torch.where(negative_rows, inputs.lengths, 0).sum()
        return token_losses, {"neg_clip_frac": clipped / negative_tokens.clamp(min=1)}
