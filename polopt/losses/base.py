"""The loss contract: `PolicyLoss` (every registered loss), `TokenLevelLoss`, `LossOutput`.

    out = loss_fn(logprobs, old_logprobs, mask, rewards, group_ids,
                  correct_rate=None, normalizer=None, ref_logprobs=None)

    logprobs      [B, T]  log π_θ(a_t | q, a_<t), with grad
    old_logprobs  [B, T]  log π_old of the sampling policy
    mask          [B, T]  response tokens (bool or 0/1)
    rewards       [B]     0/1 verifier rewards
    group_ids     [B]     equal for the answers to one prompt
    correct_rate  [B]     r̂ of each row's group over the WHOLE group; default: computed from the rows
                          given, which is right only when every group is whole in this call
    normalizer            the whole batch's denominator (see aggregation.py) for micro-batches/ranks
    ref_logprobs  [B, T]  log π_ref, needed only when kl_coef > 0

Loss math runs in fp32, or in the inputs' dtype if wider.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
from torch import nn

from polopt.losses.aggregation import LOSS_AGG_MODES, Normalizer, aggregate, check_loss_agg
from polopt.losses.inputs import LossInputs, check_max_response_len, check_number, prepare_inputs
from polopt.losses.ratios import k3_kl, likelihood_ratio


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar, to backward
    metrics: dict[str, float]


class PolicyLoss(nn.Module):
    """Base of every registered loss. Subclasses implement `compute`; `forward` is the contract.

    `normalizer_kind` ∈ {"tokens", "sequences", "sequences_x_horizon", "groups", "none"} names the
    denominator the loss divides by (aggregation.py); `global_normalizer` computes it for a batch.
    """

    name: ClassVar[str] = ""
    # The metric that best shows this loss at work, shown on the recipe's progress bar.
    progress_metric: ClassVar[Optional[str]] = None
    normalizer_kind: str = "none"
    max_response_len: Optional[int] = None
    kl_coef: float = 0.0

    def forward(
        self,
        logprobs: torch.Tensor,
        old_logprobs: torch.Tensor,
        mask: torch.Tensor,
        rewards: torch.Tensor,
        group_ids: torch.Tensor,
        *,
        correct_rate: Optional[torch.Tensor] = None,
        normalizer: Optional[Normalizer] = None,
        ref_logprobs: Optional[torch.Tensor] = None,
    ) -> LossOutput:
        if self.kl_coef > 0 and ref_logprobs is None:
            raise ValueError(f"{self.name} with kl_coef={self.kl_coef} needs ref_logprobs [B, T]")
        inputs = prepare_inputs(
            logprobs, old_logprobs, mask, rewards, group_ids, correct_rate, normalizer, ref_logprobs
        )
        loss, metrics = self.compute(inputs, normalizer)
        metrics.update(ratio_metrics(inputs))
        return LossOutput(loss=loss, metrics=to_floats(metrics))

    def compute(
        self, inputs: LossInputs, normalizer: Optional[Normalizer]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def extra_repr(self) -> str:
        names = [p for p in inspect.signature(type(self).__init__).parameters if p != "self"]
        return ", ".join(f"{name}={getattr(self, name)!r}" for name in names if hasattr(self, name))


class TokenLevelLoss(PolicyLoss):
    """A loss that is a per-token term ℓ_bt aggregated by `loss_agg`, plus an optional k3 KL term.

    Subclasses implement `token_losses`; padding and the rows of groups with r̂ ∈ {0, 1} are zeroed
    here (the latter with torch.where), so neither value nor gradient can pick up 0·inf.
    """

    def __init__(self, loss_agg: str, max_response_len: Optional[int] = None, kl_coef: float = 0.0) -> None:
        super().__init__()
        self.loss_agg = check_loss_agg(loss_agg)
        self.max_response_len = check_max_response_len(max_response_len)
        self.kl_coef = check_number("kl_coef", kl_coef, low=0.0, low_open=False)

    @property
    def normalizer_kind(self) -> str:  # type: ignore[override]
        return LOSS_AGG_MODES[self.loss_agg]

    def token_losses(self, inputs: LossInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """ℓ [B, T] (finite everywhere; masked by the caller) and loss-specific metrics."""
        raise NotImplementedError

    def compute(self, inputs, normalizer):
        token_losses, metrics = self.token_losses(inputs)
        # ℓ is finite on padding too (log R = 0 there), so × 0 is an exact mask. Rows without signal
        # may hold placeholders: torch.where, not × 0, zeroes them.
        row_sums = (token_losses * inputs.float_mask).sum(dim=-1)
        row_sums = torch.where(inputs.informative, row_sums, 0.0)
        if self.kl_coef > 0:
            kl_row_sums = (k3_kl(inputs.logprobs, inputs.ref_logprobs, inputs.mask) * inputs.float_mask).sum(dim=-1)
            row_sums = row_sums + self.kl_coef * kl_row_sums
            metrics["kl"] = kl_row_sums.detach().sum() / inputs.lengths.sum().clamp(min=1)
        width = inputs.mask.shape[1]
        loss = aggregate(
            row_sums, inputs.lengths, width, self.loss_agg, normalizer=normalizer, max_response_len=self.max_response_len
        )
        return loss, metrics


def ratio_metrics(inputs: LossInputs) -> dict[str, torch.Tensor]:
    """Likelihood-ratio statistics over response tokens (0 when there are none) and token counts."""
    with torch.no_grad():
        mask, log_ratio, lengths = inputs.mask, inputs.log_ratio, inputs.lengths
        tokens = lengths.sum()
        zero = torch.zeros((), dtype=log_ratio.dtype, device=log_ratio.device)
        # R is exactly 1 on padding (log R = 0 there): subtract the padding from the plain sum.
        ratio_sum = likelihood_ratio(log_ratio).sum() - (mask.numel() - tokens)
        log_ratio_min = torch.where(mask, log_ratio, math.inf).amin() if mask.numel() else zero
        log_ratio_max = torch.where(mask, log_ratio, -math.inf).amax() if mask.numel() else zero
        has_tokens = tokens > 0
        return {
            "ratio_mean": ratio_sum / tokens.clamp(min=1),
            "ratio_min": torch.where(has_tokens, likelihood_ratio(log_ratio_min), zero),
            "ratio_max": torch.where(has_tokens, likelihood_ratio(log_ratio_max), zero),
            "pos_tokens": torch.where(inputs.positive, lengths, 0).sum(),
            "neg_tokens": torch.where(inputs.positive, 0, lengths).sum(),
            "informative_frac": inputs.informative.sum() / max(mask.shape[0], 1),
        }


def to_floats(metrics: dict[str, torch.Tensor]) -> dict[str, float]:
    """One device sync for all metrics."""
    if not metrics:
        return {}
    device = next((v.device for v in metrics.values() if isinstance(v, torch.Tensor)), None)
    values = [torch.as_tensor(v, device=device).detach().to(torch.float64).reshape(()) for v in metrics.values()]
    return dict(zip(metrics, torch.stack(values).tolist()))
