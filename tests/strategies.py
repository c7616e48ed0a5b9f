"""The loss tests' hypothesis strategies: re-exported from the conformance kit, so polopt's own
losses and third-party ones are checked on exactly the same inputs (one definition, in
polopt/testing/strategies.py).

LOSS_AGG_MODES is polopt's dict (mode → normalizer kind) and PROMPT_WEIGHTS a tuple; iterate them,
or use `loss_aggs` / `prompt_weights` to draw one.
"""

from polopt.testing.strategies import (
    LOSS_AGG_MODES,
    PROMPT_WEIGHTS,
    TOKEN_LEVEL_LOSSES,
    PolicyBatch,
    clip_ranges,
    epsilons_above_one,
    epsilons_at_most_one,
    extreme_batches,
    group_rewards,
    loss_aggs,
    loss_configs,
    policy_batches,
    prompt_weights,
    splits,
    token_level_options,
    token_weights,
)

__all__ = [
    "LOSS_AGG_MODES",
    "PROMPT_WEIGHTS",
    "TOKEN_LEVEL_LOSSES",
    "PolicyBatch",
    "clip_ranges",
    "epsilons_above_one",
    "epsilons_at_most_one",
    "extreme_batches",
    "group_rewards",
    "loss_aggs",
    "loss_configs",
    "policy_batches",
    "prompt_weights",
    "splits",
    "token_level_options",
    "token_weights",
]
