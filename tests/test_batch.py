"""RolloutBatch: collate's layout and group statistics, split into mini-batches of whole groups."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from polopt.batch import Completion, PromptGroup, RolloutBatch, scored_rewards


@st.composite
def prompt_groups(draw) -> list[PromptGroup]:
    groups = []
    for _ in range(draw(st.integers(1, 8))):
        prompt = draw(st.lists(st.integers(1, 50), min_size=1, max_size=6))
        completions, rewards = [], []
        for _ in range(draw(st.integers(2, 5))):
            n = draw(st.integers(0, 7))
            completions.append(Completion(list(range(1, n + 1)), [-0.5] * n, truncated=draw(st.booleans())))
            rewards.append(float(draw(st.booleans())))
        groups.append(PromptGroup(prompt, "1", completions, rewards=scored_rewards(completions, rewards)))
    return groups


@given(prompt_groups())
def test_collate_layout_and_group_statistics(groups):
    batch = RolloutBatch.collate(groups, pad_id=0)
    rows = [(g, c) for g in groups for c in g.completions]
    assert len(batch) == len(rows)
    P = batch.prompt_len
    for i, (g, c) in enumerate(rows):
        # Prompt left-padded to P, response right after it; the masks mark exactly the real tokens.
        assert batch.input_ids[i, P - len(g.prompt_ids) : P].tolist() == g.prompt_ids
        assert batch.input_ids[i, P : P + len(c.token_ids)].tolist() == c.token_ids
        assert int(batch.response_mask[i].sum()) == len(c.token_ids)
        assert int(batch.attention_mask[i].sum()) == len(g.prompt_ids) + len(c.token_ids)
    # The groups' rewards are final (truncated answers already 0); r̂ is the mean of each group's.
    assert batch.rewards.tolist() == [r for g in groups for r in g.rewards]
    assert all(r == 0.0 for g in groups for c, r in zip(g.completions, g.rewards) if c.truncated)
    for gid in batch.group_ids.unique():
        rows_of_group = batch.group_ids == gid
        assert torch.equal(batch.correct_rate[rows_of_group], batch.rewards[rows_of_group].mean().expand(int(rows_of_group.sum())))
    assert batch.num_tokens == sum(len(c.token_ids) for _, c in rows)


@given(prompt_groups(), st.integers(1, 8), st.booleans())
def test_split_partitions_rows_into_whole_groups(groups, num_minibatches, balance_tokens):
    batch = RolloutBatch.collate(groups, pad_id=0)
    if num_minibatches > len(groups):
        with pytest.raises(ValueError, match="whole groups"):
            batch.split(num_minibatches, balance_tokens=balance_tokens)
        return
    parts = batch.split(num_minibatches, balance_tokens=balance_tokens)
    assert len(parts) == num_minibatches and all(len(p) > 0 for p in parts)
    seen = []
    for part in parts:
        for gid in part.group_ids.unique():
            # A group is never cut: all its rows are in this mini-batch, with r̂ of the whole group.
            assert int((part.group_ids == gid).sum()) == int((batch.group_ids == gid).sum())
            seen.append(int(gid))
    assert sorted(seen) == batch.group_ids.unique().tolist()
    assert sum(p.num_tokens for p in parts) == batch.num_tokens


def test_balanced_split_evens_out_tokens():
    long = PromptGroup([1], "1", [Completion([1] * 30, [0.0] * 30, False)] * 2, rewards=[1.0, 0.0])
    short = [PromptGroup([1], "1", [Completion([1] * 10, [0.0] * 10, False)] * 2, rewards=[1.0, 0.0]) for _ in range(3)]
    batch = RolloutBatch.collate([long, *short], pad_id=0)
    in_order = [p.num_tokens for p in batch.split(2)]
    balanced = [p.num_tokens for p in batch.split(2, balance_tokens=True)]
    assert max(balanced) - min(balanced) < max(in_order) - min(in_order)
    assert sorted(balanced) == [60, 60]


def test_groups_need_one_reward_per_answer():
    with pytest.raises(ValueError, match="1 rewards for 2 completions"):
        PromptGroup([1], "1", [Completion([2], [0.0], False)] * 2, rewards=[1.0])
    with pytest.raises(ValueError, match="at least one completion"):
        PromptGroup([1], "1", [], rewards=[])
    with pytest.raises(ValueError, match="logprobs"):
        Completion([1, 2], [0.0], False)
