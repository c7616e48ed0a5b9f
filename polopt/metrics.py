"""Training metrics that mean the same thing on one rank and on many.

Every logged metric is a ratio of two sums, Σ value / Σ weight, taken over micro-batches,
mini-batches and ranks alike; `reduce` adds both sums across ranks in one all-reduce. The weight
says what the metric is a mean of:

    entropy                   weight = response tokens       → token mean over the whole step
    a loss's own metrics      weight = 1 per micro-batch     → mean over every micro-batch of every rank
    loss, grad_norm, lr       weight = 1 per optimiser step on every rank, value identical on all
                              ranks (already global)        → mean over the step's optimiser steps
    rollout metrics           weight = 1 per rank            → mean over ranks (every rank samples
                              the same number of prompts)
"""

from __future__ import annotations

from typing import Callable, Mapping, Optional

import torch


class MetricSums:
    """Σ value and Σ weight per metric name; `reduce` turns them into means across ranks."""

    def __init__(self) -> None:
        self._sums: dict[str, list[float]] = {}

    def add(self, name: str, value: float, weight: float = 1.0) -> None:
        """Add `value` (a sum over `weight` items: a mean times its count) to metric `name`."""
        entry = self._sums.setdefault(name, [0.0, 0.0])
        entry[0] += float(value)
        entry[1] += float(weight)

    def add_means(self, means: Mapping[str, float], weight: float = 1.0) -> None:
        """Add each of `means` (a mean over `weight` items) with that weight."""
        for name, value in means.items():
            self.add(name, float(value) * weight, weight)

    def merge(self, other: "MetricSums") -> None:
        for name, (value, weight) in other._sums.items():
            self.add(name, value, weight)

    def reduce(
        self,
        all_reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
        names: Optional[list[str]] = None,
    ) -> dict[str, float]:
        """{name: Σ value / Σ weight} with both sums added over ranks by `all_reduce` (a SUM
        all-reduce; None on one process). Every rank must pass the same `names` (default: its own,
        sorted); a name a rank never added counts there as 0 / 0. Names with total weight 0 are left
        out."""
        names = sorted(self._sums) if names is None else names
        sums = torch.tensor([self._sums.get(n, [0.0, 0.0]) for n in names], dtype=torch.float64).reshape(-1, 2)
        if all_reduce is not None:
            sums = all_reduce(sums)
        return {n: (v / w) for n, (v, w) in zip(names, sums.tolist()) if w > 0}

    @property
    def names(self) -> list[str]:
        return sorted(self._sums)
