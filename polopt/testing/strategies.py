"""Hypothesis strategies for policy losses: batches of grouped answers with binary rewards.

Shared by polopt's own property tests (tests/) and the conformance kit (`check_policy_loss`), so
that a third-party loss is checked on exactly the inputs polopt's losses are.

Hypothesis draws the structure (groups, group sizes 2–16, reward patterns, ragged response lengths
including empty rows, row order) and a seed; the seed fills the log-probabilities through a
torch.Generator, so examples stay cheap and shrink to small structures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional

import torch
from hypothesis import strategies as st

from polopt.losses import BUILTIN_LOSSES, GRPO_FAMILY, TOKEN_LEVEL_LOSSES
from polopt.losses.aggregation import LOSS_AGG_MODES
from polopt.losses.group_stats import PROMPT_WEIGHTS
from polopt.losses.ratios import RATIO_LEVELS



@dataclass
class PolicyBatch:
    """One call's inputs; `logprobs` is a fresh leaf with requires_grad each time `leaf()` is called."""

    logprobs: torch.Tensor
    old_logprobs: torch.Tensor
    mask: torch.Tensor  # bool, each row a prefix (responses are right-padded)
    rewards: torch.Tensor
    group_ids: torch.Tensor

    def leaf(self) -> torch.Tensor:
        return self.logprobs.detach().clone().requires_grad_(True)

    @property
    def lengths(self) -> torch.Tensor:
        return self.mask.sum(dim=-1)

    def on_policy(self) -> "PolicyBatch":
        return replace(self, old_logprobs=self.logprobs.detach().clone())


def group_rewards(draw, size: int, pattern: str) -> list[float]:
    if pattern == "all_right":
        num_right = size
    elif pattern == "all_wrong":
        num_right = 0
    else:
        num_right = draw(st.integers(1, size - 1))
    order = draw(st.permutations(range(size)))
    return [1.0 if position < num_right else 0.0 for position in order]


@st.composite
def policy_batches(
    draw,
    *,
    max_groups: int = 4,
    min_group_size: int = 2,
    max_group_size: int = 16,
    max_len: int = 10,
    min_len: int = 0,
    signal: str = "first",
    max_log_ratio_scale: float = 1.5,
    dtype: torch.dtype = torch.float64,
    padding_value: Optional[float] = None,
) -> PolicyBatch:
    """A batch of groups. `signal`: "first" — the first group has a right and a wrong answer with
    tokens, the others may be all right or all wrong; "all" — every group is mixed; "none" — every
    group is all right or all wrong. Padding holds garbage (±50, or `padding_value`) that every loss
    must ignore. On tokens, log π_old = log π_θ + scale·N(0, 1)."""
    num_groups = draw(st.integers(1, max_groups))
    choices = {"first": ["mixed", "mixed", "all_right", "all_wrong"], "all": ["mixed"], "none": ["all_right", "all_wrong"]}
    patterns = [draw(st.sampled_from(choices[signal])) for _ in range(num_groups)]
    if signal == "first":
        patterns[0] = "mixed"
    rewards: list[float] = []
    group_ids: list[int] = []
    for group, pattern in enumerate(patterns):
        size = draw(st.integers(min_group_size, max_group_size))
        rewards += group_rewards(draw, size, pattern)
        group_ids += [7 * group + 3] * size  # arbitrary, non-contiguous ids
    batch = len(rewards)
    width = draw(st.integers(max(min_len, 1), max_len))
    lengths = torch.tensor(draw(st.lists(st.integers(min_len, width), min_size=batch, max_size=batch)))
    scale = draw(st.floats(0.0, max_log_ratio_scale))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))

    order = torch.randperm(batch, generator=generator)  # groups interleaved in the batch
    rewards_t = torch.tensor(rewards, dtype=torch.float64)[order]
    group_ids_t = torch.tensor(group_ids)[order]
    if signal != "none":  # the first group's signal: a right and a wrong answer with tokens
        for reward in (0.0, 1.0):
            row = ((group_ids_t == group_ids[0]) & (rewards_t == reward)).nonzero()[0, 0]
            lengths[row] = max(int(lengths[row]), 1)
    mask = torch.arange(width)[None, :] < lengths[:, None]
    logprobs = -3 * torch.rand(batch, width, generator=generator, dtype=torch.float64)
    old_logprobs = logprobs + scale * torch.randn(batch, width, generator=generator, dtype=torch.float64)
    garbage = (100 * torch.rand(batch, width, generator=generator, dtype=torch.float64) - 50) if padding_value is None else padding_value
    logprobs = torch.where(mask, logprobs, garbage)
    old_logprobs = torch.where(mask, old_logprobs, garbage)
    return PolicyBatch(
        logprobs=logprobs.to(dtype),
        old_logprobs=old_logprobs.to(dtype),
        mask=mask,
        rewards=rewards_t.to(dtype),
        group_ids=group_ids_t,
    )


epsilons_at_most_one = st.floats(0.05, 1.0)
epsilons_above_one = st.floats(1.05, 4.0)
clip_ranges = st.floats(0.05, 0.95)
loss_aggs = st.sampled_from(list(LOSS_AGG_MODES))
prompt_weights = st.sampled_from(list(PROMPT_WEIGHTS))


@st.composite
def token_level_options(draw, name: str) -> dict:
    """The token-level losses' options (ratio level, clamp of log R, constant normaliser; NFT: clip
    of r̂), each drawn or left at its default, with ranges where the clamps do act on our batches."""
    options = dict(
        ratio_level=draw(st.sampled_from(RATIO_LEVELS)),
        max_log_ratio=draw(st.none() | st.floats(0.05, 3.0)),
        constant_normalizer=draw(st.none() | st.floats(0.5, 1000.0)),
    )
    if name == "nft":
        clip = draw(st.none() | st.tuples(st.floats(0.0, 0.45), st.floats(0.55, 1.0)))
        options["correct_rate_clip"] = None if clip is None else list(clip)
    return options


@st.composite
def loss_configs(
    draw,
    names: tuple[str, ...] = BUILTIN_LOSSES,
    options: Optional[bool] = None,
):
    """(name, hyperparameters) of any registered loss, over the valid ranges of its knobs; the
    token-level options are drawn half of the time (`options`: always or never)."""
    name = draw(st.sampled_from(names))
    if name == "nft":
        hparams = dict(
            epsilon=draw(st.floats(0.05, 3.0)),
            prompt_weight=draw(prompt_weights),
            neg_weight=draw(st.floats(0.0, 2.0)),
            loss_agg=draw(loss_aggs),
        )
    elif name == "rft":
        hparams = dict(loss_agg=draw(loss_aggs))
    elif name in GRPO_FAMILY:
        hparams = dict(clip_low=draw(clip_ranges), clip_high=draw(clip_ranges), loss_agg=draw(loss_aggs))
    else:
        hparams = dict(beta=draw(st.floats(0.01, 2.0)), sft_coef=draw(st.floats(0.0, 1.0)))
    if name in TOKEN_LEVEL_LOSSES and (draw(st.booleans()) if options is None else options):
        hparams.update(draw(token_level_options(name)))
    return name, hparams


@st.composite
def token_weights(draw, batch: PolicyBatch, padding_value: float = math.nan) -> torch.Tensor:
    """Rollout-correction weights [B, T] for `batch`: each token 0, 1 or uniform in [0, 3] (the mix
    drawn per example, so some examples are all ones or all zeros), `padding_value` on padding."""
    kinds = draw(st.lists(st.sampled_from(["zero", "one", "uniform"]), min_size=1, max_size=3, unique=True))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    shape = batch.logprobs.shape
    choice = torch.randint(len(kinds), shape, generator=generator)
    values = {"zero": torch.zeros(shape), "one": torch.ones(shape), "uniform": 3 * torch.rand(shape, generator=generator)}
    weights = torch.zeros(shape, dtype=torch.float64)
    for position, kind in enumerate(kinds):
        weights = torch.where(choice == position, values[kind].double(), weights)
    return torch.where(batch.mask, weights, padding_value).to(batch.logprobs.dtype)


@st.composite
def splits(draw, batch: PolicyBatch, whole_groups: bool) -> list[torch.Tensor]:
    """Row indices of 1–4 disjoint parts covering the batch (whole groups if asked)."""
    units = batch.group_ids if whole_groups else torch.arange(batch.rewards.numel())
    unique_units = units.unique()
    parts = draw(st.integers(1, min(4, unique_units.numel())))
    assignment = torch.tensor(draw(st.lists(st.integers(0, parts - 1), min_size=unique_units.numel(), max_size=unique_units.numel())))
    part_of_row = assignment[torch.searchsorted(unique_units, units)]
    return [rows for part in range(parts) if (rows := (part_of_row == part).nonzero().flatten()).numel()]


@st.composite
def extreme_batches(draw, magnitude: float, **batch_options):
    """Batches whose every token has log π_θ − log π_old ∈ {−magnitude, 0, +magnitude}."""
    batch = draw(policy_batches(**batch_options))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    signs = torch.randint(-1, 2, batch.logprobs.shape, generator=generator).double()
    return replace(batch, old_logprobs=torch.where(batch.mask, batch.logprobs - magnitude * signs, batch.old_logprobs))
