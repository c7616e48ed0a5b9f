"""Mini-batches over the global batch: `num_minibatches` optimiser steps per rollout on any rank count.

After a rollout each rank holds the groups it kept (filtering leaves different counts per rank).
The global batch is every rank's groups, round-robin over ranks (local group j of rank r comes
before local group j of rank r + 1, and after every rank's group j − 1: on a fresh stream that
is the order of the 1-rank run's prompts). It is cut into `num_minibatches` mini-batches of whole
groups exactly as one rank would cut it (`batch.assign_groups`), and each mini-batch's answers are
dealt to the ranks in near-equal shares. So the k-th optimiser step sees the same answers on any
number of ranks; only their placement differs.

    shapes = all-gather of [(rows, tokens) per local group]          (a few ints per group)
    plan   = plan_minibatches(shapes, num_minibatches, ...)          pure, the same on every rank
    shares = exchange_rows(plan, rank, local rows, scatter)          rows move only where the plan says

Answers of one group may sit on different ranks: each row carries its group's r̂ (`correct_rate=`)
and the loss of every rank divides by the normaliser of the whole mini-batch (`normalizer=`), which
keeps the arithmetic exact (docs/design.md, "Loss contract"). A loss that needs whole groups in one
call (`PolicyLoss.needs_whole_groups`, InfoNCA) gets whole groups dealt instead of answers.

A rank whose share of a mini-batch is empty (more ranks than answers) still runs the mini-batch's
forwards and backwards, on `RolloutBatch.placeholder` rows, because FSDP's are collective.
Fewer groups than `num_minibatches` (filtering kept too few) gives one step per group, with a warning.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from polopt.batch import Row, RolloutBatch, assign_groups


@dataclass(frozen=True)
class GroupShape:
    """What the plan needs of a group: its answer count and response tokens (for balancing)."""

    rows: int
    tokens: int


@dataclass(frozen=True)
class RowRef:
    """Answer `row` of local group `group` on rank `rank`."""

    rank: int
    group: int
    row: int


@dataclass(frozen=True)
class MinibatchPlan:
    """`shares[k][r]`: the answers rank r trains on in mini-batch k, in global order.
    `global_ids[r][j]`: the global id of rank r's local group j."""

    shares: list[list[list[RowRef]]]
    global_ids: list[list[int]]
    num_groups: int
    num_tokens: int

    @property
    def num_minibatches(self) -> int:
        return len(self.shares)


def global_order(shapes: Sequence[Sequence[GroupShape]]) -> list[tuple[int, int]]:
    """(rank, local group) of every group in the global batch: round-robin over ranks."""
    longest = max((len(s) for s in shapes), default=0)
    return [(r, j) for j in range(longest) for r in range(len(shapes)) if j < len(shapes[r])]


def plan_minibatches(
    shapes: Sequence[Sequence[GroupShape]],
    num_minibatches: int,
    *,
    whole_groups: bool = False,
    balance_tokens: bool = False,
) -> MinibatchPlan:
    """Cut the global batch described by `shapes[rank][local group]` into min(num_minibatches,
    groups) mini-batches of whole groups and deal each to the ranks (module docstring)."""
    world_size = len(shapes)
    order = global_order(shapes)
    global_ids = [[-1] * len(s) for s in shapes]
    for gid, (r, j) in enumerate(order):
        global_ids[r][j] = gid
    tokens = [shapes[r][j].tokens for r, j in order]
    buckets = assign_groups(tokens, min(num_minibatches, len(order)), balance_tokens) if order else []
    shares = []
    for bucket in buckets:
        groups = [order[gid] for gid in bucket]
        deal = _deal_groups if whole_groups else _deal_rows
        shares.append(deal(groups, shapes, world_size))
    return MinibatchPlan(shares=shares, global_ids=global_ids, num_groups=len(order), num_tokens=sum(tokens))


def _deal_rows(groups: list[tuple[int, int]], shapes, world_size: int) -> list[list[RowRef]]:
    """Near-equal answer counts per rank (the first n % W ranks one more); each rank keeps its own
    answers up to its quota, and the rest fill the other ranks' shortfall in global order."""
    rows = [RowRef(r, j, i) for r, j in groups for i in range(shapes[r][j].rows)]
    per, extra = divmod(len(rows), world_size)
    quota = [per + (1 if r < extra else 0) for r in range(world_size)]
    shares: list[list[RowRef]] = [[] for _ in range(world_size)]
    surplus = []
    for ref in rows:
        if len(shares[ref.rank]) < quota[ref.rank]:
            shares[ref.rank].append(ref)
        else:
            surplus.append(ref)
    spare = iter(surplus)
    for r in range(world_size):
        shares[r].extend(next(spare) for _ in range(quota[r] - len(shares[r])))
    position = {ref: n for n, ref in enumerate(rows)}
    return [sorted(share, key=position.__getitem__) for share in shares]


def _deal_groups(groups: list[tuple[int, int]], shapes, world_size: int) -> list[list[RowRef]]:
    """Whole groups per rank, near-equal answer counts: a group stays on its rank while that rank is
    under ceil(answers / W); the others go to the rank with the fewest answers so far."""
    total = sum(shapes[r][j].rows for r, j in groups)
    target = -(-total // world_size)
    load = [0] * world_size
    placed: dict[tuple[int, int], int] = {}
    for r, j in groups:
        if load[r] + shapes[r][j].rows <= target:
            placed[(r, j)] = r
            load[r] += shapes[r][j].rows
    for r, j in groups:
        if (r, j) not in placed:
            dest = min(range(world_size), key=lambda d: (load[d], d))
            placed[(r, j)] = dest
            load[dest] += shapes[r][j].rows
    shares: list[list[RowRef]] = [[] for _ in range(world_size)]
    for r, j in groups:  # global order
        shares[placed[(r, j)]].extend(RowRef(r, j, i) for i in range(shapes[r][j].rows))
    return shares


# scatter(src, objects) -> the object sent to this rank: objects is one per rank on `src`, None elsewhere
Scatter = Callable[[int, Optional[list]], object]


def exchange_rows(
    plan: MinibatchPlan, rank: int, local_rows: Sequence[Sequence[Row]], scatter: Optional[Scatter] = None
) -> list[list[Row]]:
    """This rank's rows of every mini-batch, in global order. `local_rows[j][i]` is answer i of local
    group j; rows other ranks need are sent with `scatter` (one call per rank that sends any)."""
    mine: list[list[Optional[Row]]] = [[None] * len(shares[rank]) for shares in plan.shares]
    for k, shares in enumerate(plan.shares):
        for position, ref in enumerate(shares[rank]):
            if ref.rank == rank:
                mine[k][position] = _with_global_id(local_rows[ref.group][ref.row], plan.global_ids[rank][ref.group])
    for src in _senders(plan):
        if scatter is None:
            raise ValueError("exchange_rows: rows must move between ranks, but no scatter was given")
        outgoing = outgoing_rows(plan, src, local_rows) if rank == src else None
        for k, position, row in scatter(src, outgoing) or []:
            mine[k][position] = row
    missing = [(k, p) for k, rows in enumerate(mine) for p, row in enumerate(rows) if row is None]
    if missing:
        raise RuntimeError(f"exchange_rows: rank {rank} did not receive rows {missing[:5]} of its plan")
    return mine  # type: ignore[return-value]


def _senders(plan: MinibatchPlan) -> list[int]:
    """Ranks that hold rows another rank trains on."""
    return sorted({ref.rank for shares in plan.shares for dest, share in enumerate(shares) for ref in share if ref.rank != dest})


def outgoing_rows(plan: MinibatchPlan, src: int, local_rows: Sequence[Sequence[Row]]) -> list[list[tuple[int, int, Row]]]:
    """What rank `src` sends: per destination rank, (mini-batch, position in its share, row)."""
    outgoing: list[list[tuple[int, int, Row]]] = [[] for _ in plan.global_ids]
    for k, shares in enumerate(plan.shares):
        for dest, share in enumerate(shares):
            for position, ref in enumerate(share):
                if ref.rank == src and dest != src:
                    row = _with_global_id(local_rows[ref.group][ref.row], plan.global_ids[src][ref.group])
                    outgoing[dest].append((k, position, row))
    return outgoing


def _with_global_id(row: Row, group_id: int) -> Row:
    return Row(row.prompt_ids, row.completion, row.reward, row.correct_rate, group_id)


@dataclass
class MinibatchShare:
    """This rank's part of one global mini-batch: its answers (`share`, None if it holds none), the
    same answers as `micro_batches` (placeholders included), and the global batch's token count."""

    share: Optional[RolloutBatch]
    micro_batches: list[RolloutBatch]
    global_tokens: int


def micro_batches(share: Optional[RolloutBatch], n: int, whole_groups: bool, pad_id: int) -> list[RolloutBatch]:
    """Exactly `n` micro-batches of a rank's share (every rank runs the same number of forwards):
    whole groups where the share holds at least `n` (as one rank always did), else answers (unless
    `whole_groups`); placeholders fill what is missing."""
    if share is None or len(share) == 0:
        return [RolloutBatch.placeholder(pad_id) for _ in range(n)]
    num_groups = share.group_ids.unique().numel()
    if num_groups >= n:
        parts = share.split(n)
    elif whole_groups:
        parts = share.split(num_groups)
    else:
        parts = [share.select(rows) for rows in torch.arange(len(share)).tensor_split(min(n, len(share)))]
    return parts + [RolloutBatch.placeholder(pad_id) for _ in range(n - len(parts))]
