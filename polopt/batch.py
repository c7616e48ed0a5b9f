"""What flows between the stages of the data path.

    rollout engine + verifier  ->  PromptGroup (one prompt, its K Completions, final rewards, r̂)
    filter                     ->  the groups worth training on (0 < r̂ < 1)
    (both in polopt.rollout.sampler)
    RolloutBatch.collate(groups)  ->  padded tensors for the trainer
    RolloutBatch.split(n)         ->  mini-batches of whole groups

Layout of a collated batch (B rows, prompt width P, response width T, S = P + T):

    input_ids       [B, S]  prompt left-padded to P, then the response right-padded to T
    attention_mask  [B, S]  True on real tokens (prompt and response, stop token included)
    response_mask   [B, T]  True on the response tokens the loss counts
    old_logprobs    [B, T]  log π_old(a_t | q, a_<t) as the sampler reported them (0 on padding);
                            the recipe replaces them with the trainer's own when recompute_old_logprobs
    rollout_logprobs [B, T] the engine's log-probs, kept as reported (0 on padding): with
                            old_logprobs they give the rollout correction (polopt.rollout.correction)
    rollout_weights [B, T]  that correction's per-token loss weights, None when it is off
    rewards         [B]     the groups' final rewards (truncated answers scored 0 by the sampler)
    group_ids       [B]     equal for the K answers of one prompt
    correct_rate    [B]     r̂ of each row's group (PromptGroup.correct_rate, over the whole group)

The trainer's log-prob of response token t sits at logits position P - 1 + t.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Optional, Sequence

import torch



@dataclass
class Completion:
    """One sampled answer: its token ids, per-token sampling log-probs, and whether it hit the
    token limit before a stop token (truncated answers are scored wrong)."""

    token_ids: list[int]
    logprobs: list[float]
    truncated: bool
    text: str = ""

    def __post_init__(self) -> None:
        if len(self.token_ids) != len(self.logprobs):
            raise ValueError(
                f"Completion has {len(self.token_ids)} token_ids but {len(self.logprobs)} logprobs"
            )


@dataclass(frozen=True)
class PromptGroup:
    """A prompt and its K sampled answers with their final rewards (truncated answers already 0).

    `correct_rate` r̂ = mean reward of the K answers is computed here, once; the filter, the batch
    and the loss all read this value."""

    prompt_ids: list[int]
    answer: str
    completions: list[Completion]
    rewards: list[float]
    correct_rate: float = field(init=False)

    def __post_init__(self) -> None:
        if len(self.rewards) != len(self.completions) or not self.completions:
            raise ValueError(
                f"PromptGroup needs one reward per completion and at least one completion, got "
                f"{len(self.rewards)} rewards for {len(self.completions)} completions"
            )
        object.__setattr__(self, "correct_rate", sum(self.rewards) / len(self.rewards))


def scored_rewards(completions: Sequence[Completion], verifier_rewards: Sequence[float]) -> list[float]:
    """The rewards a group trains on: the verifier's, except that truncated answers score 0
    (an answer cut off at max_new_tokens is wrong whatever it contains, the paper's setting)."""
    return [0.0 if c.truncated else float(r) for c, r in zip(completions, verifier_rewards, strict=True)]


@dataclass(frozen=True)
class Row:
    """One answer on its way to a trainer rank: mini-batches over the global batch may put the
    answers of one group on several ranks, so each carries its group's id and r̂ (over the whole group)."""

    prompt_ids: list[int]
    completion: Completion
    reward: float
    correct_rate: float
    group_id: int


def group_rows(groups: Sequence[PromptGroup], group_ids: Optional[Sequence[int]] = None) -> list[Row]:
    """The rows of `groups`, group ids 0, 1, ... in order unless given."""
    ids = range(len(groups)) if group_ids is None else group_ids
    return [
        Row(g.prompt_ids, c, r, g.correct_rate, gid)
        for g, gid in zip(groups, ids, strict=True)
        for c, r in zip(g.completions, g.rewards)
    ]


@dataclass
class RolloutBatch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    old_logprobs: torch.Tensor
    rewards: torch.Tensor
    group_ids: torch.Tensor
    correct_rate: torch.Tensor
    prompt_len: int
    rollout_logprobs: Optional[torch.Tensor] = None
    rollout_weights: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def response_len(self) -> int:
        return self.response_mask.shape[1]

    @property
    def num_tokens(self) -> int:
        """Response tokens the loss counts (the global normaliser of `token-mean`)."""
        return int(self.response_mask.sum())

    @classmethod
    def collate(cls, groups: list[PromptGroup], pad_id: int) -> "RolloutBatch":
        """Pad whole groups into one batch. Group ids are 0, 1, ... in the order of `groups`."""
        if not groups:
            raise ValueError("RolloutBatch.collate got no groups")
        return cls.collate_rows(group_rows(groups), pad_id)

    @classmethod
    def collate_rows(cls, rows: Sequence["Row"], pad_id: int) -> "RolloutBatch":
        """Pad rows (answers, possibly of partial groups: each carries its group's id and r̂) into one batch."""
        if not rows:
            raise ValueError("RolloutBatch.collate_rows got no rows")
        prompt_len = max(len(row.prompt_ids) for row in rows)
        response_len = max(1, max(len(row.completion.token_ids) for row in rows))
        B, S = len(rows), prompt_len + response_len
        input_ids = torch.full((B, S), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((B, S), dtype=torch.bool)
        response_mask = torch.zeros((B, response_len), dtype=torch.bool)
        old_logprobs = torch.zeros((B, response_len), dtype=torch.float32)
        for i, row in enumerate(rows):
            c = row.completion
            p, n = len(row.prompt_ids), len(c.token_ids)
            input_ids[i, prompt_len - p : prompt_len] = torch.tensor(row.prompt_ids, dtype=torch.long)
            attention_mask[i, prompt_len - p : prompt_len] = True
            if n:
                input_ids[i, prompt_len : prompt_len + n] = torch.tensor(c.token_ids, dtype=torch.long)
                old_logprobs[i, :n] = torch.tensor(c.logprobs, dtype=torch.float32)
            attention_mask[i, prompt_len : prompt_len + n] = True
            response_mask[i, :n] = True
        return cls(
            input_ids=input_ids,
            attention_mask=attention_mask,
            response_mask=response_mask,
            old_logprobs=old_logprobs,
            rollout_logprobs=old_logprobs.clone(),
            rewards=torch.tensor([row.reward for row in rows], dtype=torch.float32),
            group_ids=torch.tensor([row.group_id for row in rows], dtype=torch.long),
            correct_rate=torch.tensor([row.correct_rate for row in rows], dtype=torch.float32),
            prompt_len=prompt_len,
        )

    @classmethod
    def placeholder(cls, pad_id: int) -> "RolloutBatch":
        """One row that the loss does not count (no response token): what a rank with no rows in a
        mini-batch runs its forward and backward on, since FSDP's are collective. Its gradient is 0."""
        rows = [Row(prompt_ids=[pad_id], completion=Completion([pad_id], [0.0], truncated=True), reward=0.0,
                    correct_rate=0.0, group_id=-1)]
        batch = cls.collate_rows(rows, pad_id)
        batch.response_mask[:] = False
        return batch

    def _tensor_fields(self):
        return [f.name for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)]

    def select(self, rows: torch.Tensor) -> "RolloutBatch":
        """The sub-batch of the given row indices (prompt width and response width are kept)."""
        return replace(self, **{name: getattr(self, name)[rows] for name in self._tensor_fields()})

    def to(self, device: torch.device | str) -> "RolloutBatch":
        return replace(self, **{name: getattr(self, name).to(device) for name in self._tensor_fields()})

    def split(self, num_minibatches: int, balance_tokens: bool = False) -> list["RolloutBatch"]:
        """Split into `num_minibatches` mini-batches, each holding whole groups.

        Groups are assigned in order (equal group counts, as the paper's 16 mini-batches), or with
        `balance_tokens=True` greedily to the mini-batch with the fewest response tokens so far
        (longest groups first), which evens out the work per optimiser step.
        """
        group_list = self.group_ids.unique(sorted=True).tolist()
        tokens_per_group = [int(self.response_mask[self.group_ids == g].sum()) for g in group_list]
        buckets = [[group_list[i] for i in bucket] for bucket in assign_groups(tokens_per_group, num_minibatches, balance_tokens)]
        out = []
        for bucket in buckets:
            rows = torch.cat([(self.group_ids == g).nonzero().flatten() for g in sorted(bucket)])
            out.append(self.select(rows))
        return out


def assign_groups(tokens_per_group: Sequence[int], num_buckets: int, balance_tokens: bool = False) -> list[list[int]]:
    """Indices of groups (in order) → `num_buckets` lists of whole groups: consecutive runs of equal
    counts, or with `balance_tokens` greedily to the bucket with the fewest tokens so far (longest
    groups first), which evens out the work per optimiser step. Each bucket's indices are sorted."""
    num_groups = len(tokens_per_group)
    if num_buckets < 1:
        raise ValueError(f"num_minibatches must be >= 1, got {num_buckets}")
    if num_buckets > num_groups:
        raise ValueError(f"cannot split {num_groups} groups into {num_buckets} mini-batches of whole groups")
    buckets: list[list[int]] = [[] for _ in range(num_buckets)]
    if balance_tokens:
        load = [0] * num_buckets
        for g in sorted(range(num_groups), key=lambda g: -tokens_per_group[g]):
            k = min(range(num_buckets), key=lambda k: (load[k], len(buckets[k])))
            buckets[k].append(g)
            load[k] += tokens_per_group[g]
        return [sorted(b) for b in buckets]
    per, extra = divmod(num_groups, num_buckets)
    start = 0
    for k in range(num_buckets):
        n = per + (1 if k < extra else 0)
        buckets[k] = list(range(start, start + n))
        start += n
    return buckets
