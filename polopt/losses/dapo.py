"""DAPO (Yu et al. 2025): GRPO's clipped surrogate with clip-higher and token-level averaging.

    A = (r − r̂) / sqrt(r̂ (1 − r̂))                                                  (Eq. 4)
    ℓ_t = −min(R_t A, clip(R_t, 1 − ε_low, 1 + ε_high) A),  ε_low = 0.2, ε_high = 0.28 (Eq. 3)
    loss = Σ_bt m ℓ / Σ_bt m                                                 (`token-mean`)

DAPO's dynamic sampling (drop groups with r̂ ∈ {0, 1} and re-sample) lives in the data path;
overlong reward shaping is left out so that rewards stay binary (Appendix B).
"""

from __future__ import annotations

from polopt.losses.grpo import GRPOLoss
from polopt.losses.registry import register_loss


@register_loss("dapo")
class DAPOLoss(GRPOLoss):
    def __init__(
        self, clip_low: float = 0.2, clip_high: float = 0.28, loss_agg: str = "token-mean", **options
    ) -> None:
        super().__init__(clip_low, clip_high, loss_agg, **options)
