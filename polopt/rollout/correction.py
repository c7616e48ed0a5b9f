"""Rollout–trainer mismatch correction: per-token weights from the engine's log-probs and π_old.

An engine that is not the trainer's own model (vLLM: other kernels, other precision, a weight copy)
samples from π_rollout, slightly different from the π_old the trainer recomputes. The importance
ratio between them,

    token level      ρ_bt = exp(log π_old(a_t) − log π_rollout(a_t))
    sequence level   ρ_b  = exp(Σ_t m_bt · (log π_old(a_t) − log π_rollout(a_t)))   (same for every t of b)

becomes a weight w_bt that multiplies each token's loss before aggregation (`token_weights=` of
every registered loss, polopt.losses.base):

    truncate   w = min(ρ, cap)                 truncated importance sampling (TIS; TRL
                                               `vllm_importance_sampling_mode="*_truncate"`, cap 3)
    mask       w = ρ · [min_ratio ≤ ρ ≤ cap]   the ratio, or 0 for a token/answer outside the band
                                               (TRL "*_mask", verl's rejection modes, OpenRLHF icepop)

with `min_ratio` (None = no lower bound) also clamping from below in truncate mode, as TRL's
`vllm_importance_sampling_clip_min` does. Padding (m_bt = 0) never enters a sum and gets w = 1.
Identical log-probs give ρ = 1 exactly, so w = 1 exactly and the loss is the uncorrected one bit
for bit. Weights are constants: computed without grad from detached inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

LEVELS = ("token", "sequence")
MODES = ("truncate", "mask")


@dataclass(frozen=True)
class RolloutCorrection:
    """The `rollout_correction` config section; `enabled: false` (the default) means no weights."""

    enabled: bool = False
    level: str = "token"
    mode: str = "truncate"
    cap: float = 3.0
    min_ratio: Optional[float] = None

    def __post_init__(self) -> None:
        if self.level not in LEVELS:
            raise ValueError(f"rollout_correction.level must be one of {', '.join(LEVELS)}, got {self.level!r}")
        if self.mode not in MODES:
            raise ValueError(f"rollout_correction.mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if not self.cap >= 1:
            raise ValueError(f"rollout_correction.cap must be >= 1 (a ratio of 1 is never corrected), got {self.cap}")
        if self.min_ratio is not None and not 0 <= self.min_ratio <= 1:
            raise ValueError(f"rollout_correction.min_ratio must be None or in [0, 1], got {self.min_ratio}")

    @torch.no_grad()
    def weights(
        self, old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, mask: torch.Tensor
    ) -> tuple[Optional[torch.Tensor], dict[str, float]]:
        """(w [B, T] or None when disabled, metrics). Metrics describe the mismatch whether or not
        the correction is enabled: ratio min/mean/max at the chosen level, the fraction of
        tokens capped (truncate) or masked (mask), and the mean |Δ log-prob| per token."""
        mask = mask.bool()
        delta = torch.where(mask, old_logprobs.detach().double() - rollout_logprobs.detach().double(), 0.0)
        if self.level == "sequence":
            log_ratio = delta.sum(-1, keepdim=True).expand_as(delta)
        else:
            log_ratio = delta
        # Clamped in log space so that exp never overflows; the cap bounds the weight anyway.
        ratio = log_ratio.clamp(max=80.0).exp()
        if self.mode == "truncate":
            weights = ratio.clamp(min=self.min_ratio, max=self.cap)
            corrected = (ratio > self.cap) | (ratio < (self.min_ratio or 0.0))
        else:
            corrected = (ratio > self.cap) | (ratio < (self.min_ratio if self.min_ratio is not None else -1.0))
            weights = torch.where(corrected, 0.0, ratio)
        weights = torch.where(mask, weights, 1.0).to(old_logprobs.dtype)
        metrics = _metrics(ratio, corrected, delta, mask, "capped_fraction" if self.mode == "truncate" else "masked_fraction")
        return (weights if self.enabled else None), metrics


def _metrics(ratio, corrected, delta, mask, corrected_name: str) -> dict[str, float]:
    tokens = int(mask.sum())
    if tokens == 0:
        return {}
    real = ratio[mask]
    return {
        "rollout_correction/ratio_min": real.min().item(),
        "rollout_correction/ratio_mean": real.mean().item(),
        "rollout_correction/ratio_max": real.max().item(),
        f"rollout_correction/{corrected_name}": (corrected & mask).sum().item() / tokens,
        "rollout_correction/logprob_abs_diff_mean": delta.abs().sum().item() / tokens,
    }
