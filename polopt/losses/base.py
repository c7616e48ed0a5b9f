"""The loss contract: `PolicyLoss` (every registered loss), `TokenLevelLoss`, `LossOutput`.

    out = loss_fn(logprobs, old_logprobs, mask, rewards, group_ids,
                  correct_rate=None, normalizer=None, ref_logprobs=None, token_weights=None)

    logprobs      [B, T]  log π_θ(a_t | q, a_<t), with grad
    old_logprobs  [B, T]  log π_old of the sampling policy
    mask          [B, T]  response tokens (bool or 0/1)
    rewards       [B]     0/1 verifier rewards
    group_ids     [B]     equal for the answers to one prompt
    correct_rate  [B]     r̂ of each row's group over the WHOLE group; default: computed from the rows
                          given, which is right only when every group is whole in this call
    normalizer            the whole batch's denominator (see aggregation.py) for micro-batches/ranks
    ref_logprobs  [B, T]  log π_ref, needed only when kl_coef > 0
    token_weights [B, T]  w_bt ≥ 0, constants (detached here): rollout correction, e.g. truncated
                          importance weights min(π_old/π_engine, C) or a 0/1 mask of rejected tokens

Rollout correction enters the contract once, here, not per loss: a token-level loss (`TokenLevelLoss`,
every built-in but InfoNCA, and a user's subclass with no code of its own) aggregates w_bt · ℓ_bt
instead of ℓ_bt,

    loss = aggregate_bt(m_bt · w_bt · ℓ_bt)          (denominators unchanged: they count tokens)

so a weight of 0 removes a token's contribution (value and gradient) but not its place in the
denominator, and micro-batching with the global normalizer stays exact. At a sequence
`ratio_level` a token's log-prob also enters its answer's ratio, which the answer's other tokens
use; the weight removes the token's own term. The k3 KL term is not weighted (verl weights the
policy term only). `token_weights=None` runs exactly the unweighted code; weights of 1 give bit
for bit the same loss and gradient. A loss that writes its own `compute` states what the weights
mean for it by setting `accepts_token_weights = True` and reading `inputs.token_weights`
(InfoNCA: a per-answer weight, see infonca.py); one that does not declare it raises when given
weights, rather than dropping them silently. Weights on padding are ignored.

Loss math runs in fp32, or in the inputs' dtype if wider.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, replace
from typing import ClassVar, Optional

import torch
from torch import nn

from polopt.losses.aggregation import (
    LOSS_AGG_MODES,
    Normalizer,
    aggregate,
    check_constant_normalizer,
    check_loss_agg,
)
from polopt.losses.inputs import LossInputs, check_max_response_len, check_number, prepare_inputs
from polopt.losses.ratios import check_ratio_level, k3_kl, likelihood_ratio, policy_log_ratio


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar, to backward
    metrics: dict[str, float]


class PolicyLoss(nn.Module):
    """Base of every registered loss. Subclasses implement `compute`; `forward` is the contract.

    `normalizer_kind` ∈ {"tokens", "sequences", "sequences_x_horizon", "groups", "none"} names the
    denominator the loss divides by (aggregation.py); `global_normalizer` computes it for a batch.
    `accepts_token_weights`: whether `compute` reads `inputs.token_weights` (module docstring).
    """

    name: ClassVar[str] = ""
    accepts_token_weights: ClassVar[bool] = False
    # The metric that best shows this loss at work, shown on the recipe's progress bar.
    progress_metric: ClassVar[Optional[str]] = None
    normalizer_kind: str = "none"
    max_response_len: Optional[int] = None
    constant_normalizer: Optional[float] = None
    kl_coef: float = 0.0

    @property
    def needs_whole_groups(self) -> bool:
        """Whether one call must see all answers of each group it gets (a per-group normaliser, as
        InfoNCA's softmax over the group); other losses take partial groups with `correct_rate=`."""
        return self.normalizer_kind == "groups"

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
        token_weights: Optional[torch.Tensor] = None,
    ) -> LossOutput:
        if self.kl_coef > 0 and ref_logprobs is None:
            raise ValueError(f"{self.name} with kl_coef={self.kl_coef} needs ref_logprobs [B, T]")
        if token_weights is not None and not self.accepts_token_weights:
            raise ValueError(
                f"loss {self.name or type(self).__qualname__} does not declare how it uses token_weights: subclass "
                "TokenLevelLoss, or set accepts_token_weights = True and read inputs.token_weights in compute()"
            )
        inputs = prepare_inputs(
            logprobs, old_logprobs, mask, rewards, group_ids, correct_rate, normalizer, ref_logprobs, token_weights
        )
        loss, metrics = self.compute(inputs, normalizer)
        metrics.update(ratio_metrics(inputs))
        return LossOutput(loss=loss, metrics=to_floats(metrics))

    def compute(
        self, inputs: LossInputs, normalizer: Optional[Normalizer]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return ", ".join(f"{name}={getattr(self, name)!r}" for name in hparam_names(type(self)) if hasattr(self, name))


def hparam_names(cls: type[PolicyLoss]) -> list[str]:
    """The loss's hyperparameters: its constructor's arguments, and through a `**options` those of
    the base it passes them to (the token-level options live once, in TokenLevelLoss)."""
    names: list[str] = []
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        parameters = inspect.signature(klass.__init__).parameters.values()
        names += [p.name for p in parameters if p.name != "self" and p.kind is not p.VAR_KEYWORD and p.name not in names]
        if not any(p.kind is p.VAR_KEYWORD for p in parameters):
            break
    return names


class TokenLevelLoss(PolicyLoss):
    """A loss that is a per-token term ℓ_bt aggregated by `loss_agg`, plus an optional k3 KL term.

    Options shared by every token-level loss, which each loss takes as `**options` (defaults: the
    plain per-token loss of the papers):
        max_response_len     L of `seq-mean-token-sum-norm` (default: the mask's width)
        kl_coef              weight of a k3 KL term to `ref_logprobs=` (default 0: none)
        ratio_level          "token" | "sequence_sum" | "sequence_mean": the log-ratio ℓ_bt is
                             computed from (ratios.py; default "token")
        max_log_ratio        c: log R ← min(log R, c), a plain clamp (default None: none)
        constant_normalizer  C: loss = (numerator of loss_agg) / C, e.g. Σ_bt m ℓ / C with
                             token-sum, a denominator fixed for the run (aggregation.py; default
                             None: the counted one)

    Subclasses implement `token_losses`; padding and the rows of groups with r̂ ∈ {0, 1} are zeroed
    here (the latter with torch.where), so neither value nor gradient can pick up 0·inf; the token
    weights, when given, multiply ℓ_bt here too.
    """

    accepts_token_weights = True

    def __init__(
        self,
        loss_agg: str,
        max_response_len: Optional[int] = None,
        kl_coef: float = 0.0,
        ratio_level: str = "token",
        max_log_ratio: Optional[float] = None,
        constant_normalizer: Optional[float] = None,
    ) -> None:
        super().__init__()
        self.loss_agg = check_loss_agg(loss_agg)
        self.max_response_len = check_max_response_len(max_response_len)
        self.kl_coef = check_number("kl_coef", kl_coef, low=0.0, low_open=False)
        self.ratio_level = check_ratio_level(ratio_level)
        self.max_log_ratio = None if max_log_ratio is None else check_number("max_log_ratio", max_log_ratio, low=0.0)
        self.constant_normalizer = check_constant_normalizer(constant_normalizer)

    @property
    def normalizer_kind(self) -> str:  # type: ignore[override]
        return "none" if self.constant_normalizer is not None else LOSS_AGG_MODES[self.loss_agg]

    def token_losses(self, inputs: LossInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """ℓ [B, T] (finite everywhere; masked by the caller) and loss-specific metrics.

        `inputs.log_ratio` is already at the loss's `ratio_level` and clamped at `max_log_ratio`."""
        raise NotImplementedError

    def compute(self, inputs, normalizer):
        if self.ratio_level != "token" or self.max_log_ratio is not None:
            level_log_ratio = policy_log_ratio(
                inputs.log_ratio, inputs.mask, inputs.lengths, self.ratio_level, self.max_log_ratio
            )
            inputs = replace(inputs, log_ratio=level_log_ratio)
        token_losses, metrics = self.token_losses(inputs)
        # ℓ is finite on padding too (log R = 0 there), so × 0 is an exact mask. Rows without signal
        # may hold placeholders: torch.where, not × 0, zeroes them.
        masked_losses = token_losses * inputs.float_mask
        if inputs.token_weights is not None:
            masked_losses = masked_losses * inputs.token_weights
        row_sums = masked_losses.sum(dim=-1)
        row_sums = torch.where(inputs.informative, row_sums, 0.0)
        if self.kl_coef > 0:
            kl_row_sums = (k3_kl(inputs.logprobs, inputs.ref_logprobs, inputs.mask) * inputs.float_mask).sum(dim=-1)
            row_sums = row_sums + self.kl_coef * kl_row_sums
            metrics["kl"] = kl_row_sums.detach().sum() / inputs.lengths.sum().clamp(min=1)
        width = inputs.mask.shape[1]
        if normalizer is None:
            normalizer = self.constant_normalizer
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
        weights = {} if inputs.token_weights is None else {"token_weight_mean": inputs.token_weights.sum() / tokens.clamp(min=1)}
        return weights | {
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
