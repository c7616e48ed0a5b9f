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
"""

from __future__ import annotations

import torch

from polopt.losses.aggregation import divide
from polopt.losses.base import PolicyLoss
from polopt.losses.group_stats import group_index
from polopt.losses.inputs import LossInputs, check_number
from polopt.losses.registry import register_loss


def group_log_softmax(logits: torch.Tensor, index: torch.Tensor, num_groups: int) -> torch.Tensor:
    """log softmax of `logits` [B] within each group (index [B] in [0, G)), shifted by the group max."""
    group_max = torch.full((num_groups,), -torch.inf, dtype=logits.dtype, device=logits.device)
    group_max = group_max.scatter_reduce(0, index, logits.detach(), reduce="amax")
    shifted = logits - group_max[index]
    sum_exp = torch.zeros_like(group_max).index_add(0, index, torch.exp(shifted))
    return shifted - torch.log(sum_exp)[index]


@register_loss("infonca")
class InfoNCALoss(PolicyLoss):
    normalizer_kind = "groups"
    progress_metric = "positive_prob_mass"

    def __init__(self, beta: float = 0.1, sft_coef: float = 0.0) -> None:
        super().__init__()
        self.beta = check_number("beta", beta, low=0.0)
        self.sft_coef = check_number("sft_coef", sft_coef, low=0.0, low_open=False)

    def compute(self, inputs: LossInputs, normalizer):
        index, num_groups = group_index(inputs.group_ids)
        sequence_log_ratio = inputs.log_ratio.sum(dim=-1)
        log_probs = group_log_softmax(self.beta * sequence_log_ratio, index, num_groups)

        rewards = inputs.rewards
        num_positive = torch.zeros(num_groups, dtype=rewards.dtype, device=rewards.device).index_add(0, index, rewards)
        target = rewards / num_positive[index].clamp(min=1)  # r_k / Σ_i r_i
        token_mean_log_ratio = sequence_log_ratio / inputs.lengths.clamp(min=1)
        row_losses = -target * (log_probs + self.sft_coef * token_mean_log_ratio)
        row_losses = torch.where(inputs.informative, row_losses, 0.0)  # groups without signal: exactly 0
        loss = divide(row_losses.sum(), num_groups if normalizer is None else normalizer)

        with torch.no_grad():  # softmax mass on the right answers, averaged over groups with signal
            group_size = torch.bincount(index, minlength=num_groups)[index]
            groups_with_signal = torch.where(inputs.informative, 1 / group_size, 0.0).sum()  # Σ 1/K = count
            positive_mass = torch.where(inputs.informative & inputs.positive, log_probs.exp(), 0.0).sum()
        return loss, {"positive_prob_mass": positive_mass / groups_with_signal.clamp(min=1)}
