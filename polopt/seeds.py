"""Every sampling seed of a run is derived from the run's `seed` here, and nowhere else.

    rollout_seed(seed, step, shard)   the rollout of training step `step` on data shard `shard`
                                      (polopt/topology.py: the ranks of a tensor-parallel group share
                                      a shard and must share the seed); a resumed run, or a producer
                                      process ahead of the trainer, samples exactly what the original did
    validation_seed(seed, shard)      held-out sampling during training: the same draw at every
                                      validation, so curves differ by the policy, not the dice
    call_seed(seed, i)                the i-th engine call made under `seed`: a generation batch of the
                                      dynamic sampler, a chunk of questions in evaluation

The evaluate recipe samples with its `seed` through `call_seed`. An engine's own seed (vLLM's `seed`
argument) only seeds requests that carry none; every request polopt makes carries one.
"""

from __future__ import annotations

from typing import Optional


def rollout_seed(seed: int, step: int, shard: int) -> int:
    return (seed * 1_000_003 + step * 7919 + shard * 104_729) % (2**31 - 1)


def validation_seed(seed: int, shard: int) -> int:
    return rollout_seed(seed + 1, 0, shard)


def call_seed(seed: Optional[int], i: int) -> Optional[int]:
    return None if seed is None else seed + i
