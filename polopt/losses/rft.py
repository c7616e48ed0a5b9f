"""RFT — Rejection-sampling Fine-Tuning: maximum likelihood on the correct answers only.

    ℓ_t = r · (−log R_t),   R_t = π_θ(a_t | q, a_<t) / π_old(a_t | q, a_<t)

Eq. 10 with the negative term dropped and ω(q) = 1 (Appendix B, "RFT zeros out negative data loss
in NFT implementation and keeps a constant prompt weight"). −log π_old is a baseline: the gradient
is the SFT gradient −∇log π_θ on positive tokens, and the loss is 0 at π_θ = π_old.
The token-level options (`max_response_len`, `kl_coef`, `ratio_level`, `max_log_ratio`,
`constant_normalizer`; base.py) are NFT's too, so NFT with neg_weight = 0 and ω = 1 stays RFT
under every option.
"""

from __future__ import annotations

import torch

from polopt.losses.base import TokenLevelLoss
from polopt.losses.inputs import LossInputs
from polopt.losses.registry import register_loss


@register_loss("rft")
class RFTLoss(TokenLevelLoss):
    def __init__(self, loss_agg: str = "token-mean", **options) -> None:
        super().__init__(loss_agg, **options)

    def token_losses(self, inputs: LossInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return torch.where(inputs.positive[:, None], -inputs.log_ratio, 0.0), {}
