"""Rollout → verify → filter: the data path from prompts to the groups a loss trains on.

    sampler = DynamicSampler(prompt_stream, engine, verifier, num_prompts=N, num_samples=K, params=...)
    groups, metrics = sampler.sample(seed=s)      # up to N PromptGroups, rewards final, 0 < r̂ < 1

Dynamic sampling (DAPO §3.2; NFT Algorithm 1, line 8): keep only prompts whose K answers are neither
all right nor all wrong, and draw more prompts until the training batch is full.

    repeat up to max_gen_batches times:
        prompts = prompt_stream.next_batch()                 # the stream's batch_size prompts
        groups  = generate_and_verify(engine, verifier, prompts, K, params with seed + i)
        keep groups with 0 < r̂ < 1 (all groups if filter_groups=False)
        stop once num_prompts groups are kept
    return at most num_prompts groups (fewer, with a warning, if the draws ran out)

Groups with r̂ ∈ {0, 1} carry no gradient for any polopt loss (every advantage / NFT weight is zero
there), so training on them only dilutes the batch. `generate_and_verify` is also what evaluation
uses, so a question is scored the same way in training and in evaluation.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Callable, Optional, Sequence

import torch

from polopt.batch import PromptGroup, scored_rewards
from polopt.losses.group_stats import informative
from polopt.prompts import Prompt
from polopt.rollout import RolloutEngine, SamplingParams
from polopt.seeds import call_seed
from polopt.verify import verification_counts

log = logging.getLogger(__name__)

Verifier = Callable[[list[str], list[str]], list[float]]


def generate_and_verify(
    engine: RolloutEngine, verifier: Verifier, prompts: Sequence[Prompt], num_samples: int, params: SamplingParams
) -> list[PromptGroup]:
    """K answers per prompt from `engine`, scored by `verifier`; truncated answers score 0.

    The returned groups' rewards are final: nothing downstream rescores them."""
    for i, p in enumerate(prompts):
        if not isinstance(p, Prompt):
            raise TypeError(f"prompt {i} of the batch is a {type(p).__name__}, not a polopt.prompts.Prompt")
    completions = engine.generate([p.token_ids for p in prompts], num_samples, params)
    if len(completions) != len(prompts) or any(len(c) != num_samples for c in completions):
        raise RuntimeError(
            f"the rollout engine returned {[len(c) for c in completions]} completions for "
            f"{len(prompts)} prompts × {num_samples} samples"
        )
    texts = [c.text for group in completions for c in group]
    answers = [p.answer for p, group in zip(prompts, completions) for _ in group]
    rewards = list(verifier(texts, answers))
    if len(rewards) != len(texts):
        raise RuntimeError(f"the verifier returned {len(rewards)} rewards for {len(texts)} completions")
    bad = [r for r in rewards if not 0.0 <= float(r) <= 1.0]
    if bad:
        raise ValueError(f"the verifier returned rewards outside [0, 1]: {bad[:5]}")
    K = num_samples
    return [
        PromptGroup(
            prompt_ids=list(p.token_ids),
            answer=p.answer,
            completions=group,
            rewards=scored_rewards(group, rewards[i * K : (i + 1) * K]),
        )
        for i, (p, group) in enumerate(zip(prompts, completions))
    ]


class DynamicSampler:
    """Rollout → verify → filter, returning up to `num_prompts` groups and their metrics.

    `prompt_stream.next_batch()` returns a list of `Prompt`s; its `batch_size` is the generation
    batch (the recipe sets it: `filter.gen_batch_size` per data shard, polopt/topology.py). `params` are the sampling settings of every step;
    `sample(seed)` draws generation batch i with seed + i, so batches differ and a step is
    reproducible from its seed alone.
    """

    def __init__(
        self,
        prompt_stream,
        engine: RolloutEngine,
        verifier: Verifier,
        *,
        num_prompts: int,
        num_samples: int,
        params: SamplingParams,
        max_gen_batches: int = 3,
        filter_groups: bool = True,
        agree: Optional[Callable[[bool], bool]] = None,
    ) -> None:
        for name, value in (("num_prompts", num_prompts), ("num_samples", num_samples), ("max_gen_batches", max_gen_batches)):
            if isinstance(value, bool) or int(value) != value or value < 1:
                raise ValueError(f"DynamicSampler: {name} must be an integer >= 1, got {value!r}")
        if not isinstance(params, SamplingParams):
            raise TypeError(f"DynamicSampler: params must be polopt.rollout.SamplingParams, got {type(params).__name__}")
        self.prompt_stream = prompt_stream
        self.engine = engine
        self.verifier = verifier
        self.num_prompts = int(num_prompts)
        self.num_samples = int(num_samples)
        self.params = params
        self.max_gen_batches = int(max_gen_batches)
        self.filter_groups = filter_groups
        # Ranks sharing one engine (tensor parallelism) must make the same generation calls: `agree`
        # makes "draw another batch" true for all of them or for none (all-reduce MIN in the group).
        self.agree = agree or (lambda condition: condition)

    def sample(self, seed: Optional[int] = None) -> tuple[list[PromptGroup], dict[str, float]]:
        kept: list[PromptGroup] = []
        generated: list[PromptGroup] = []
        gen_batches = 0
        counts_before = verification_counts(self.verifier)
        while self.agree(len(kept) < self.num_prompts and gen_batches < self.max_gen_batches):
            prompts = self.prompt_stream.next_batch()
            if not self.agree(bool(prompts)):
                log.warning("DynamicSampler: the prompt stream returned an empty batch; stopping early")
                break
            params = replace(self.params, seed=call_seed(seed, gen_batches))
            groups = generate_and_verify(self.engine, self.verifier, prompts, self.num_samples, params)
            gen_batches += 1
            generated.extend(groups)
            if self.filter_groups:
                keep = informative(torch.tensor([g.correct_rate for g in groups], dtype=torch.float64)).tolist()
                kept.extend(g for g, k in zip(groups, keep) if k)
            else:
                kept.extend(groups)
        kept = kept[: self.num_prompts]
        if len(kept) < self.num_prompts:
            log.warning(
                "DynamicSampler: %d of %d groups after %d generation batches (%d prompts drawn, %s); training on what there is",
                len(kept), self.num_prompts, gen_batches, len(generated),
                "filter on: the rest had r̂ ∈ {0, 1}" if self.filter_groups else "filter off",
            )
        return kept, {**rollout_metrics(generated, kept, gen_batches), **verification_counts(self.verifier, counts_before)}


def rollout_metrics(generated: list[PromptGroup], kept: list[PromptGroup], gen_batches: int) -> dict[str, float]:
    """Floats for the metric logger. Fractions are over all generated groups (kept_fraction is the
    share the filter passes, 0 < r̂ < 1, whether or not the batch had room for it)."""
    rates = torch.tensor([g.correct_rate for g in generated], dtype=torch.float64)
    rewards = [r for g in generated for r in g.rewards]
    kept_rewards = [r for g in kept for r in g.rewards]
    lengths = [len(c.token_ids) for g in generated for c in g.completions]
    truncated = [c.truncated for g in generated for c in g.completions]
    n_groups = max(1, len(generated))
    return {
        "reward/mean": _mean(rewards),
        "reward/kept_mean": _mean(kept_rewards),
        "filter/kept_fraction": float(informative(rates).sum()) / n_groups,
        "filter/all_correct_fraction": float((rates == 1).sum()) / n_groups,
        "filter/all_wrong_fraction": float((rates == 0).sum()) / n_groups,
        "filter/gen_batches": float(gen_batches),
        "response/length_mean": _mean(lengths),
        "response/length_max": float(max(lengths, default=0)),
        "response/truncation_rate": _mean(truncated),
        "rollout/num_groups": float(len(kept)),
    }


def _mean(values) -> float:
    values = list(values)
    return float(sum(values)) / len(values) if values else 0.0
