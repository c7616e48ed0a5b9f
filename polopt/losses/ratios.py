"""Likelihood ratios (with their level and clamp), the straight-through max_v, and the k3 KL estimator.

    R_t = π_θ(a_t | q, a_<t) / π_old(a_t | q, a_<t) = exp(log π_θ − log π_old)      (Eq. 3)
    max_v(x, ε) = value max(x, ε), gradient of x                   (Algorithm 1, lines 2–3)
    k3_t = π_ref/π_θ − log(π_ref/π_θ) − 1                          (Schulman's k3, ≥ 0)

The log-ratio a token-level loss uses (`policy_log_ratio`), for an answer of n response tokens:

    ratio_level="token"           log R_t                                (Eq. 3; the default)
    ratio_level="sequence_sum"    Σ_t' log R_t' on every token t         (one ratio per answer:
                                  log π_θ(a|q) − log π_old(a|q), NFT's sequence mode, Eq. 9)
    ratio_level="sequence_mean"   (1/n) Σ_t' log R_t' on every token t   (GSPO, Zheng et al. 2025)

then, if `max_log_ratio` = c is set, min(log R, c): a plain clamp, so a token (or answer) whose
log-ratio exceeds c contributes a constant with zero gradient (the NFT authors' code uses c = 10).
The gradient flows through the sum/mean: a sequence level gives every token of an answer the
answer's coefficient, as the sequence objective's gradient does.

Clip fractions (GRPO's `clip_frac`, NFT's `neg_clip_frac`) count a token when its ratio lies past
the clip boundary by more than a factor e^CLIP_COUNT_MARGIN (`past_upper`, `past_lower`): the
policy has moved past the boundary, not float noise across it. The first update of a step is
on-policy, R = 1 up to the rounding of two forward passes of the same weights (the engine's and
the trainer's, or two batch layouts), and where the boundary is R = 1 itself — NFT with ε = 1 —
an exact comparison counted about half the tokens as clipped by that rounding alone. The margin,
0.1% of R, is far above fp32 rounding of log-probs and far below any clip range in use (ε of 0.2,
0.28); the loss and its gradient do not use it, only the metrics.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

# exp() of a log-ratio beyond ±60 saturates: e^60 ≈ 1e26 leaves fp32 room (max ≈ 3e38) for the
# advantage, ω, 1/ε and a sum over tokens, so every loss stays finite for any finite input. Tokens
# that far off-policy already have GRPO's gradient clipped to 0; past the cap NFT's is 0 as well.
MAX_LOG_RATIO = 60.0

RATIO_LEVELS = ("token", "sequence_sum", "sequence_mean")

# A clip fraction counts a token whose ratio is past its clip boundary by more than this much in
# log R (module docstring).
CLIP_COUNT_MARGIN = 1e-3


def masked_log_ratio(logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log R_t on response tokens, exactly 0 on padding (whatever the padding holds, even NaN)."""
    return torch.where(mask, logprobs - old_logprobs, 0.0)


def check_ratio_level(ratio_level: str) -> str:
    if ratio_level not in RATIO_LEVELS:
        raise ValueError(f"ratio_level must be one of {RATIO_LEVELS}, got {ratio_level!r}")
    return ratio_level


def policy_log_ratio(
    log_ratio: torch.Tensor,
    mask: torch.Tensor,
    lengths: torch.Tensor,
    ratio_level: str = "token",
    max_log_ratio: Optional[float] = None,
) -> torch.Tensor:
    """The log-ratio [B, T] a token-level loss uses at `ratio_level`, clamped above at `max_log_ratio`
    (module docstring); 0 on padding. `log_ratio` is log R_t, 0 on padding."""
    if ratio_level == "sequence_sum":
        log_ratio = torch.where(mask, log_ratio.sum(dim=-1, keepdim=True), 0.0)
    elif ratio_level == "sequence_mean":
        log_ratio = torch.where(mask, log_ratio.sum(dim=-1, keepdim=True) / lengths.clamp(min=1)[:, None], 0.0)
    elif ratio_level != "token":
        check_ratio_level(ratio_level)
    if max_log_ratio is not None:
        log_ratio = log_ratio.clamp(max=max_log_ratio)
    return log_ratio


def likelihood_ratio(log_ratio: torch.Tensor) -> torch.Tensor:
    """R_t = exp(log R_t), with the exponent capped at ±MAX_LOG_RATIO."""
    return torch.exp(log_ratio.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO))


def past_upper(ratio: torch.Tensor, bound) -> torch.Tensor:
    """Where R > bound·e^CLIP_COUNT_MARGIN: a clamp of R at `bound` from above counts as clipping."""
    return ratio.detach() * math.exp(-CLIP_COUNT_MARGIN) > bound


def past_lower(ratio: torch.Tensor, bound) -> torch.Tensor:
    """Where R < bound·e^−CLIP_COUNT_MARGIN: a clamp of R at `bound` from below counts as clipping."""
    return ratio.detach() * math.exp(CLIP_COUNT_MARGIN) < bound


def max_v(x: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Straight-through max (Algorithm 1): value max(x, ε) exactly, gradient ∂x.

    Written as clamp(x, ε).detach() + (x − x.detach()) so the value is exact: x − x.detach() is
    exactly 0. Algorithm 1's literal stop_grad[max(x, ε) − x] + x loses ε to cancellation when
    |x| ≫ ε (x ≈ −1e17 at a log-ratio of 40).
    """
    return x.clamp(min=epsilon).detach() + (x - x.detach())


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(π_θ ‖ π_ref); 0 on padding."""
    log_ratio_to_ref = masked_log_ratio(ref_logprobs, logprobs, mask).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
    return torch.exp(log_ratio_to_ref) - log_ratio_to_ref - 1
