"""`PromptStream`: an endless, resumable stream of prompt batches for one rank."""

from __future__ import annotations

from typing import Optional

import torch
from torchdata.stateful_dataloader import StatefulDataLoader
from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler

from polopt.prompts.dataset import Prompt


def _as_list(items: list[Prompt]) -> list[Prompt]:
    return items


class PromptStream:
    """An endless, resumable stream of prompt batches for one rank.

    Backed by torchdata's `StatefulDataLoader` over a `StatefulDistributedSampler` (rank's share,
    reshuffled each epoch via `set_epoch`, seeded by `seed`). The loader yields single prompts and
    `next_batch(n)` gathers `n` of them (default `self.batch_size`, which may be reassigned), so a
    caller can ask for batches of any size — the dynamic-sampling filter does — and epochs are
    crossed transparently. `state_dict()` records the epoch and the loader's position; a stream
    restored with `load_state_dict` yields exactly the prompts the original would have yielded next.
    """

    def __init__(
        self,
        dataset: torch.utils.data.Dataset,
        *,
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        num_replicas: int = 1,
        rank: int = 0,
    ):
        if len(dataset) == 0:
            raise ValueError("PromptStream: the dataset is empty")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"PromptStream: rank must be in [0, num_replicas={num_replicas}), got {rank}")
        self.batch_size = batch_size
        self.dataset = dataset
        self.epoch = 0
        self.sampler = StatefulDistributedSampler(
            dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False
        )
        self.loader = StatefulDataLoader(dataset, batch_size=None, sampler=self.sampler, collate_fn=_as_list, num_workers=0)
        self._iterator = None

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @batch_size.setter
    def batch_size(self, value: int) -> None:
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"PromptStream: batch_size must be a positive int, got {value!r}")
        self._batch_size = value

    def _next_item(self) -> Prompt:
        for _ in range(2):  # at most one epoch boundary per item
            if self._iterator is None:
                self.sampler.set_epoch(self.epoch)
                self._iterator = iter(self.loader)
            try:
                return next(self._iterator)
            except StopIteration:
                self._iterator = None
                self.epoch += 1
        raise RuntimeError("PromptStream: the sampler yielded nothing for a whole epoch")

    def next_batch(self, n: Optional[int] = None) -> list[Prompt]:
        """The next `n` prompts (default `batch_size`) of this rank's endless shuffled stream."""
        n = self.batch_size if n is None else n
        if n < 1:
            raise ValueError(f"PromptStream.next_batch: n must be >= 1, got {n}")
        return [self._next_item() for _ in range(n)]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "loader": self.loader.state_dict() if self._iterator is not None else None}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or "epoch" not in state or "loader" not in state:
            raise ValueError(f"PromptStream.load_state_dict: expected {{'epoch', 'loader'}}, got {state!r}")
        self.epoch = int(state["epoch"])
        self.sampler.set_epoch(self.epoch)
        self._iterator = None
        if state["loader"] is not None:
            self.loader.load_state_dict(state["loader"])
            self._iterator = iter(self.loader)
