"""InfoNCA (Chen et al. 2024), the K-answer generalisation of DPO used as "Iterative DPO" (Appendix B).

For each group of K answers with sequence log-ratios h_k = Σ_t (log π_θ − log π_old)(a_t^k):

    L_q = −Σ_k (r_k / Σ_i r_i) · log softmax_k(β h_1:K)                              (Appendix B)
          + sft_coef · (−Σ_k (r_k / Σ_i r_i) · mean_t (log π_θ − log π_old)(a_t^k))
    loss = Σ_q L_q / (number of groups)

With K = 2 and one right, one wrong answer, L_q = −log σ(β (h_w − h_l)): DPO with π_ref = π_old.
The SFT term (the regulariser Appendix B adds for stability) is the per-token NLL of the correct
answers, minus its value under π_old. Groups with r̂ ∈ {0, 1} contribute exactly 0.
Each call must hold whole groups (the softmax runs over the group's rows); the normalizer kind is
"groups": the number of groups in the whole batch, counted with or without signal.

Token weights (rollout correction, base.py). InfoNCA scores whole answers, so the token weights
become one weight per answer, the mean over its response tokens (1 for an empty answer):

    w_k = Σ_t m_t w_t / Σ_t m_t

and w_k importance-weights answer k as a sample of its group, in the target and in the softmax's
partition function alike:

    L_q = −Σ_k (w_k r_k / Σ_i w_i r_i) · [ β h_k − log Σ_i w_i exp(β h_i) + sft_coef · mean_t log R_t^k ]

w = 1 is exactly the unweighted loss; an integer weight c on answer k is c copies of it in the
group (w_k = 0 removes it, value and gradient), as importance weights of samples should be; a group
whose right answers all have weight 0 contributes 0.
"""

from __future__ import annotations

from typing import Optional

import torch

from polopt.losses.aggregation import divide
from polopt.losses.base import PolicyLoss
from polopt.losses.group_stats import group_index
from polopt.losses.inputs import LossInputs, check_number
from polopt.losses.registry import register_loss


def group_log_softmax(
    logits: torch.Tensor, index: torch.Tensor, num_groups: int, weights: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """z_k − log Σ_i w_i exp(z_i) within each group (index [B] in [0, G)), shifted by the group max.

    `weights` [B] ≥ 0 (None: all 1, the plain log softmax). Rows of weight 0 take no part in the
    sum (nor in the max, so a huge logit there cannot underflow the others); a group with no
    weighted row gets the sum 1.
    """
    group_max = torch.full((num_groups,), -torch.inf, dtype=logits.dtype, device=logits.device)
    if weights is None:
        group_max = group_max.scatter_reduce(0, index, logits.detach(), reduce="amax")
        shifted = logits - group_max[index]
        sum_exp = torch.zeros_like(group_max).index_add(0, index, torch.exp(shifted))
        return shifted - torch.log(sum_exp)[index]
    weighted = weights > 0
    group_max = group_max.scatter_reduce(0, index, torch.where(weighted, logits.detach(), -torch.inf), reduce="amax")
    group_max = torch.where(torch.isfinite(group_max), group_max, 0.0)
    shifted = logits - group_max[index]
    # exp(−inf) = 0 with gradient 0 on unweighted rows, where exp(shifted) · 0 could be inf · 0.
    terms = torch.exp(torch.where(weighted, shifted, -torch.inf)) * weights
    sum_exp = torch.zeros_like(group_max).index_add(0, index, terms)
    sum_exp = torch.where(sum_exp > 0, sum_exp, 1.0)
    return shifted - torch.log(sum_exp)[index]


def answer_weights(token_weights: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """w_k = mean of the token weights over answer k's response tokens; 1 for an empty answer."""
    return torch.where(lengths > 0, token_weights.sum(dim=-1) / lengths.clamp(min=1), 1.0)


@register_loss("infonca")
class InfoNCALoss(PolicyLoss):
    normalizer_kind = "groups"
    accepts_token_weights = True

    def __init__(self, beta: float = 0.1, sft_coef: float = 0.0) -> None:
        super().__init__()
        self.beta = check_number("beta", beta, low=0.0)
        self.sft_coef = check_number("sft_coef", sft_coef, low=0.0, low_open=False)

    def compute(self, inputs: LossInputs, normalizer):
        index, num_groups = group_index(inputs.group_ids)
        sequence_log_ratio = inputs.log_ratio.sum(dim=-1)
        weights = None if inputs.token_weights is None else answer_weights(inputs.token_weights, inputs.lengths)
        log_probs = group_log_softmax(self.beta * sequence_log_ratio, index, num_groups, weights)

        rewards = inputs.rewards if weights is None else inputs.rewards * weights
        num_positive = torch.zeros(num_groups, dtype=rewards.dtype, device=rewards.device).index_add(0, index, rewards)
        target = rewards / torch.where(num_positive > 0, num_positive, 1.0)[index]  # w_k r_k / Σ_i w_i r_i
        token_mean_log_ratio = sequence_log_ratio / inputs.lengths.clamp(min=1)
        row_losses = -target * (log_probs + self.sft_coef * token_mean_log_ratio)
        row_losses = torch.where(inputs.informative, row_losses, 0.0)  # groups without signal: exactly 0
        loss = divide(row_losses.sum(), num_groups if normalizer is None else normalizer)

        with torch.no_grad():  # softmax mass on the right answers, averaged over groups with signal
            group_size = torch.bincount(index, minlength=num_groups)[index]
            groups_with_signal = torch.where(inputs.informative, 1 / group_size, 0.0).sum()  # Σ 1/K = count
            probs = log_probs.exp() if weights is None else torch.exp(log_probs + torch.log(weights))
            positive_mass = torch.where(inputs.informative & inputs.positive, probs, 0.0).sum()
        return loss, {"positive_prob_mass": positive_mass / groups_with_signal.clamp(min=1)}
