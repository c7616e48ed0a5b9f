"""The launch's shape, decided once at setup: who shares an engine, who shares data.

    world: R ranks (torchrun), every rank a trainer shard (FSDP2 over all R)
    rollout tensor parallelism: T consecutive ranks share one vLLM engine   (T = rollout.engine.tensor_parallel_size)
    data parallelism: D = R / T data shards, one per TP group                (dp_rank = rank // T)

    R = 4, T = 2:   ranks  0 1 | 2 3
                    TP group 0  | 1       engine per group, each rank its shard of the engine's weights
                    dp_rank  0  | 1       prompts, seeds and validation questions per group

A data shard is a TP group, not a rank: the prompt stream shards by `dp_rank`, sampling seeds mix
`dp_rank` (polopt/seeds.py; the ranks of a TP group must sample with the same seed, or vLLM's
tensor-parallel sampling is silently wrong), validation shares questions by group and counts each group once
(`counts_results`). torchrun numbers ranks node by node, so a TP group stays on one node when T
divides the ranks per node; a launch that does not fit is refused at setup, naming the key.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Sequence, TypeVar

from polopt.errors import ConfigError

T = TypeVar("T")

TP_KEY = "rollout.engine.tensor_parallel_size"


@dataclass(frozen=True)
class Topology:
    world_size: int
    rank: int
    tensor_parallel_size: int = 1
    ranks_per_node: Optional[int] = None  # torchrun's LOCAL_WORLD_SIZE; None when not launched by torchrun

    def __post_init__(self) -> None:
        tp = self.tensor_parallel_size
        if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
            raise ConfigError(f"{TP_KEY}={tp!r} must be an integer >= 1", TP_KEY)
        if self.world_size % tp:
            raise ConfigError(
                f"{TP_KEY}={tp} does not divide the number of ranks ({self.world_size}); launch a multiple of "
                f"{tp} ranks or set {TP_KEY} to a divisor of {self.world_size}", TP_KEY
            )
        if self.ranks_per_node is not None and self.ranks_per_node % tp:
            raise ConfigError(
                f"{TP_KEY}={tp} would make a tensor-parallel group span nodes ({self.ranks_per_node} rank(s) per "
                f"node): set --nproc_per_node to a multiple of {tp}, or {TP_KEY} to a divisor of it", TP_KEY
            )
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"Topology: rank {self.rank} outside [0, {self.world_size})")

    @classmethod
    def from_launch(cls, world_size: int, rank: int, tensor_parallel_size: int = 1) -> "Topology":
        """The topology of this process: world size and rank from the trainer, ranks per node from
        torchrun's LOCAL_WORLD_SIZE (read now: vLLM's CPU platform overwrites it later)."""
        local = os.environ.get("LOCAL_WORLD_SIZE")
        return cls(world_size, rank, tensor_parallel_size, int(local) if local else None)

    @property
    def dp_size(self) -> int:
        """Data shards: one per tensor-parallel group."""
        return self.world_size // self.tensor_parallel_size

    @property
    def dp_rank(self) -> int:
        return self.rank // self.tensor_parallel_size

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tensor_parallel_size

    @property
    def tp_group_ranks(self) -> list[int]:
        start = self.dp_rank * self.tensor_parallel_size
        return list(range(start, start + self.tensor_parallel_size))

    @property
    def counts_results(self) -> bool:
        """Whether this rank reports its TP group's shared results (the other ranks saw the same)."""
        return self.tp_rank == 0

    def data_shard(self, items: Sequence[T]) -> list[T]:
        """This data shard's share of `items` (every TP rank of the group gets the same share)."""
        return list(items[self.dp_rank :: self.dp_size])

    def tp_slice(self, items: Sequence[T]) -> list[T]:
        """This rank's part of what its TP group produced together (its rows to train on)."""
        return list(items[self.tp_rank :: self.tensor_parallel_size])

    def per_shard(self, n: int, key: str) -> int:
        """`n` (a count over the whole run, e.g. rollout.num_prompts) split evenly over the data shards."""
        if n % self.dp_size:
            raise ConfigError(
                f"{key}={n} must be divisible by the number of data-parallel groups ({self.dp_size} = "
                f"{self.world_size} rank(s) / {TP_KEY} {self.tensor_parallel_size})", key
            )
        return n // self.dp_size
