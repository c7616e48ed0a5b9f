"""Dynamic sampling (DAPO §3.2; NFT Algorithm 1, line 8): keep only prompts whose K answers are
neither all right nor all wrong, and draw more prompts until the training batch is full.

    repeat up to max_gen_batches times:
        prompts  = prompt_stream.next_batch()                  # gen_batch_size prompts
        answers  = engine.generate(prompts, K, params)         # K completions each
        rewards  = verifier(texts, gold answers); truncated answers → 0
        keep groups with 0 < r̂ < 1 (all groups if filter_groups=False)
        stop once num_prompts groups are kept
    return at most num_prompts groups (fewer, with a warning, if the draws ran out)

Groups with r̂ ∈ {0, 1} carry no gradient for any polopt loss (every advantage / NFT weight is zero
there), so training on them only dilutes the batch.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Callable, Optional

import torch

from polopt.batch import PromptGroup, scored_rewards
from polopt.losses.group_stats import informative
from polopt.rollout import SamplingParams
from polopt.verify import verification_counts

log = logging.getLogger(__name__)

PROMPT_KEYS = ("prompt_ids", "answer")


class DynamicSampler:
    """Rollout → verify → filter, returning up to `num_prompts` groups and their metrics.

    `prompt_stream.next_batch()` returns prompt dicts {"prompt", "prompt_ids", "answer", "source"}
    (`next_batch(gen_batch_size)` when `gen_batch_size` is set); `verifier(texts, answers)` returns
    one reward in [0, 1] per text. `sampling_params` may be reassigned before each `sample()` (the
    recipe sets a per-step seed); generation batch i uses seed + i so that batches differ.
    """

    def __init__(
        self,
        prompt_stream,
        engine,
        verifier: Callable[[list[str], list[str]], list[float]],
        *,
        num_prompts: int,
        num_samples: int,
        sampling_params: SamplingParams,
        gen_batch_size: Optional[int] = None,
        max_gen_batches: int = 3,
        filter_groups: bool = True,
    ) -> None:
        for name, value in (("num_prompts", num_prompts), ("num_samples", num_samples), ("max_gen_batches", max_gen_batches)):
            if isinstance(value, bool) or int(value) != value or value < 1:
                raise ValueError(f"DynamicSampler: {name} must be an integer >= 1, got {value!r}")
        if gen_batch_size is not None and (int(gen_batch_size) != gen_batch_size or gen_batch_size < 1):
            raise ValueError(f"DynamicSampler: gen_batch_size must be None or an integer >= 1, got {gen_batch_size!r}")
        self.prompt_stream = prompt_stream
        self.engine = engine
        self.verifier = verifier
        self.num_prompts = int(num_prompts)
        self.num_samples = int(num_samples)
        self.sampling_params = sampling_params
        self.gen_batch_size = gen_batch_size
        self.max_gen_batches = int(max_gen_batches)
        self.filter_groups = filter_groups

    def sample(self) -> tuple[list[PromptGroup], dict[str, float]]:
        kept: list[PromptGroup] = []
        generated: list[PromptGroup] = []
        gen_batches = 0
        counts_before = verification_counts(self.verifier)
        while len(kept) < self.num_prompts and gen_batches < self.max_gen_batches:
            prompts = self.prompt_stream.next_batch() if self.gen_batch_size is None else self.prompt_stream.next_batch(self.gen_batch_size)
            if not prompts:
                log.warning("DynamicSampler: the prompt stream returned an empty batch; stopping early")
                break
            groups = self._generate_and_score(prompts, gen_batches)
            gen_batches += 1
            generated.extend(groups)
            keep = informative(torch.tensor([g.correct_rate for g in groups])).tolist() if self.filter_groups else [True] * len(groups)
            kept.extend(g for g, k in zip(groups, keep) if k)
        kept = kept[: self.num_prompts]
        if len(kept) < self.num_prompts:
            log.warning(
                "DynamicSampler: %d of %d groups after %d generation batches (%d prompts drawn, %s); training on what there is",
                len(kept), self.num_prompts, gen_batches, len(generated),
                "filter on: the rest had r̂ ∈ {0, 1}" if self.filter_groups else "filter off",
            )
        return kept, {**rollout_metrics(generated, kept, gen_batches), **verification_counts(self.verifier, counts_before)}

    def _generate_and_score(self, prompts: list[dict], batch_index: int) -> list[PromptGroup]:
        for i, p in enumerate(prompts):
            missing = [k for k in PROMPT_KEYS if k not in p]
            if missing:
                raise KeyError(f"DynamicSampler: prompt {i} of the batch from prompt_stream.next_batch() lacks {missing} (has {sorted(p)})")
        params = self.sampling_params
        if params.seed is not None:
            params = replace(params, seed=params.seed + batch_index)
        completions = self.engine.generate([p["prompt_ids"] for p in prompts], self.num_samples, params)
        if len(completions) != len(prompts) or any(len(c) != self.num_samples for c in completions):
            raise RuntimeError(
                f"DynamicSampler: the engine returned {[len(c) for c in completions]} completions for "
                f"{len(prompts)} prompts × {self.num_samples} samples"
            )
        texts = [c.text for group in completions for c in group]
        answers = [p["answer"] for p, group in zip(prompts, completions) for _ in group]
        rewards = list(self.verifier(texts, answers))
        if len(rewards) != len(texts):
            raise RuntimeError(f"DynamicSampler: the verifier returned {len(rewards)} rewards for {len(texts)} completions")
        bad = [r for r in rewards if not 0.0 <= float(r) <= 1.0]
        if bad:
            raise ValueError(f"DynamicSampler: the verifier returned rewards outside [0, 1]: {bad[:5]}")
        K = self.num_samples
        return [
            PromptGroup(
                prompt_ids=list(p["prompt_ids"]),
                answer=p["answer"],
                completions=group,
                rewards=scored_rewards(group, rewards[i * K : (i + 1) * K]),
            )
            for i, (p, group) in enumerate(zip(prompts, completions))
        ]


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
