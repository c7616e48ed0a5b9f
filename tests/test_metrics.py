"""MetricSums: a metric is Σ value / Σ weight, and splitting the additions over ranks changes nothing."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from polopt.metrics import MetricSums

names = st.sampled_from(["entropy", "loss", "clip_frac", "reward/mean"])
# Weights are counts (tokens, sequences, micro-batches): 0 or at least a small fraction. A subnormal
# weight under a value of order 1 would be a mean beyond float range, which no caller produces.
weights = st.one_of(st.just(0.0), st.floats(1e-3, 50.0))
additions = st.lists(st.tuples(names, st.floats(-1e3, 1e3, allow_nan=False), weights), max_size=30)


def sum_over_ranks(parts: list[torch.Tensor]):
    """What a SUM all-reduce returns on every rank, given each rank's tensor."""
    total = torch.stack(parts).sum(0)
    return lambda _local: total


@given(additions, st.integers(1, 4), st.data())
def test_reduce_over_ranks_equals_one_process(items, world_size, data):
    one = MetricSums()
    ranks = [MetricSums() for _ in range(world_size)]
    for name, value, weight in items:
        one.add(name, value, weight)
        ranks[data.draw(st.integers(0, world_size - 1))].add(name, value, weight)
    expected = one.reduce()
    union = sorted(set().union(*(r.names for r in ranks)))
    local = [torch.tensor([r._sums.get(n, [0.0, 0.0]) for n in union], dtype=torch.float64).reshape(-1, 2) for r in ranks]
    for r in ranks:
        got = r.reduce(sum_over_ranks(local), names=union)
        assert got.keys() == expected.keys()
        for name in expected:
            assert got[name] == pytest.approx(expected[name], rel=1e-9, abs=1e-9)


@given(additions)
def test_values_are_weighted_means(items):
    sums = MetricSums()
    for name, value, weight in items:
        sums.add(name, value, weight)
    for name, mean in sums.reduce().items():
        num = sum(v for n, v, _ in items if n == name)
        den = sum(w for n, _, w in items if n == name)
        assert den > 0 and mean == pytest.approx(num / den, rel=1e-9, abs=1e-9)
    # a metric whose weights are all 0 is left out, never logged as NaN
    assert all(math.isfinite(v) for v in sums.reduce().values())


def test_add_means_merge_and_missing_names():
    a, b = MetricSums(), MetricSums()
    a.add_means({"clip_frac": 0.5}, weight=2)
    b.add_means({"clip_frac": 0.2, "kl": 1.0})
    a.merge(b)
    assert a.reduce() == pytest.approx({"clip_frac": (1.0 + 0.2) / 3, "kl": 1.0})
    # a name this rank never added counts as 0 / 0: it is reduced, not a mismatched all-reduce
    assert a.reduce(names=["clip_frac", "kl", "never"]).keys() == {"clip_frac", "kl"}
