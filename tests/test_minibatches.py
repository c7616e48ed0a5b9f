"""Mini-batches over the global batch (polopt/minibatches.py), on simulated rank layouts: the
paper-scale configs get `num_minibatches` optimiser steps on 64 and 128 ranks, and any layout
trains on the mini-batches one rank would cut."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from polopt.batch import Completion, PromptGroup, RolloutBatch, group_rows
from polopt.minibatches import (
    GroupShape,
    exchange_rows,
    global_order,
    micro_batches,
    outgoing_rows,
    plan_minibatches,
)
from polopt.topology import Topology
from polopt.errors import ConfigError


def exchange_everywhere(plan, local_rows):
    """Every rank's `exchange_rows`, with the scatter done in memory from the senders' `outgoing_rows`."""
    def scatter_to(rank):
        return lambda src, objects: outgoing_rows(plan, src, local_rows[src])[rank]
    return [exchange_rows(plan, r, local_rows[r], scatter_to(r)) for r in range(len(local_rows))]


def paper_layout(world_size: int, tp: int, groups_kept=None):
    """The GPU configs' rollout: 512 prompts × 16 answers over world_size / tp data shards."""
    topology = Topology(world_size, 0, tp)
    per_shard = topology.per_shard(512, "rollout.num_prompts")
    shapes = []
    for rank in range(world_size):
        shard_groups = groups_kept(rank // tp) if groups_kept else per_shard
        mine = Topology(world_size, rank, tp).tp_slice(range(shard_groups))
        shapes.append([GroupShape(16, 16 * 300) for _ in mine])
    return shapes


@pytest.mark.parametrize("world_size, tp", [(64, 1), (128, 4), (64, 2)])
def test_paper_configs_get_their_16_optimiser_steps(world_size, tp):
    """qwen2_5_math_7b.yaml on 64 ranks held 8 groups per rank and was clamped to 8 steps (4 on 128):
    now 16 mini-batches of 32 whole prompts, 512 answers each, 8 (or 4) answers per rank."""
    plan = plan_minibatches(paper_layout(world_size, tp), 16)
    assert plan.num_minibatches == 16 and plan.num_groups == 512
    for shares in plan.shares:
        assert [len(share) for share in shares] == [512 // world_size] * world_size


def test_a_filtered_rollout_keeps_16_steps_with_uneven_ranks():
    """Ranks keep 0..15 groups after filtering (the old clamp: 0 steps, as one rank kept none)."""
    plan = plan_minibatches(paper_layout(64, 1, groups_kept=lambda shard: shard % 16), 16)
    assert plan.num_minibatches == 16
    assert sum(len(share) for shares in plan.shares for share in shares) == 16 * sum(r % 16 for r in range(64))


shapes_strategy = st.lists(
    st.lists(st.builds(GroupShape, rows=st.integers(1, 5), tokens=st.integers(0, 40)), max_size=6), min_size=1, max_size=6
)


@settings(deadline=None)
@given(shapes=shapes_strategy, num_minibatches=st.integers(1, 8), whole_groups=st.booleans(), balance=st.booleans())
def test_plan_covers_the_global_batch_once_in_mini_batches_of_whole_groups(shapes, num_minibatches, whole_groups, balance):
    plan = plan_minibatches(shapes, num_minibatches, whole_groups=whole_groups, balance_tokens=balance)
    total_groups = sum(len(s) for s in shapes)
    assert plan.num_minibatches == min(num_minibatches, total_groups)
    refs = [ref for shares in plan.shares for share in shares for ref in share]
    assert sorted((r.rank, r.group, r.row) for r in refs) == sorted(
        {(r, j, i) for r, s in enumerate(shapes) for j, g in enumerate(s) for i in range(g.rows)}
    ) and len(refs) == len(set(refs))
    for shares in plan.shares:
        groups = {(ref.rank, ref.group) for share in shares for ref in share}
        rows = sum(len(share) for share in shares)
        assert rows == sum(shapes[r][j].rows for r, j in groups)  # whole groups
        if whole_groups:  # every group on one rank
            owners = {(ref.rank, ref.group): d for d, share in enumerate(shares) for ref in share}
            assert all(owners[(ref.rank, ref.group)] == d for d, share in enumerate(shares) for ref in share)
        else:  # near-equal shares
            assert max(map(len, shares)) - min(map(len, shares)) <= 1


def fake_groups(shapes):
    """Distinct prompts and answers for `shapes[rank][group]`, r̂ of each group from its rewards."""
    out = []
    for r, rank_shapes in enumerate(shapes):
        groups = []
        for j, shape in enumerate(rank_shapes):
            completions = [Completion([r, j, i] + [7] * (shape.tokens % 3), [-0.5] * (3 + shape.tokens % 3), False)
                           for i in range(shape.rows)]
            groups.append(PromptGroup([100 + r, j], "", completions, [float(i % 2) for i in range(shape.rows)]))
        out.append(groups)
    return out


def real_tokens(batch):
    return [batch.input_ids[i][batch.attention_mask[i]].tolist() for i in range(len(batch))]


@settings(deadline=None)
@given(shapes=shapes_strategy.filter(lambda s: any(s)), num_minibatches=st.integers(1, 6), whole_groups=st.booleans())
def test_every_layout_trains_on_the_mini_batches_one_rank_would_cut(shapes, num_minibatches, whole_groups):
    """The rows all ranks receive for mini-batch k are, in global order, the k-th mini-batch of the
    1-rank batch holding the same groups in the global order."""
    groups = fake_groups(shapes)
    plan = plan_minibatches(shapes, num_minibatches, whole_groups=whole_groups)
    received = exchange_everywhere(plan, [[group_rows([g]) for g in rank_groups] for rank_groups in groups])
    one_rank = [groups[r][j] for r, j in global_order(shapes)]
    expected = RolloutBatch.collate(one_rank, pad_id=0).split(plan.num_minibatches)
    for k, minibatch in enumerate(expected):
        rows = sorted((row for rank_rows in received for row in rank_rows[k]),
                      key=lambda row: (row.group_id, row.completion.token_ids))
        got = RolloutBatch.collate_rows(rows, pad_id=0)
        assert got.group_ids.tolist() == minibatch.group_ids.tolist()
        assert got.correct_rate.tolist() == minibatch.correct_rate.tolist()
        assert real_tokens(got) == real_tokens(minibatch)


def test_micro_batches_are_whole_groups_when_there_are_enough_else_answers_then_placeholders():
    groups = fake_groups([[GroupShape(4, 5), GroupShape(4, 5)]])[0]
    share = RolloutBatch.collate(groups, pad_id=0)
    assert [m.group_ids.unique().tolist() for m in micro_batches(share, 2, False, 0)] == [[0], [1]]
    answers = micro_batches(share.select(share.group_ids.eq(0).nonzero().flatten()), 3, False, 0)
    assert [len(m) for m in answers] == [2, 1, 1]
    whole = micro_batches(share, 3, True, 0)
    assert [m.num_tokens > 0 for m in whole] == [True, True, False]
    assert [m.num_tokens for m in micro_batches(None, 2, True, 0)] == [0, 0]


def test_topology_groups_consecutive_ranks_and_refuses_what_does_not_fit():
    t = Topology(world_size=8, rank=5, tensor_parallel_size=2, ranks_per_node=4)
    assert (t.dp_size, t.dp_rank, t.tp_rank, t.tp_group_ranks) == (4, 2, 1, [4, 5])
    assert [Topology(8, r, 2, 4).dp_rank for r in range(8)] == [0, 0, 1, 1, 2, 2, 3, 3]  # the seeds' shard
    assert t.data_shard(list(range(10))) == [2, 6] and t.tp_slice(list(range(5))) == [1, 3]
    with pytest.raises(ConfigError, match=r"tensor_parallel_size=4 does not divide the number of ranks \(6\)"):
        Topology(6, 0, 4)
    with pytest.raises(ConfigError, match=r"span nodes \(2 rank\(s\) per node\).*--nproc_per_node"):
        Topology(8, 0, 4, ranks_per_node=2)
    with pytest.raises(ConfigError, match=r"rollout.num_prompts=6 must be divisible by the number of data-parallel groups \(4"):
        Topology(8, 0, 2).per_shard(6, "rollout.num_prompts")
