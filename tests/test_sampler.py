"""DynamicSampler (polopt.rollout.sampler): the filter logic over random reward patterns (a scripted engine and verifier
defined here), then once end to end with the real native engine and MathVerifier."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from polopt.batch import Completion, RolloutBatch, scored_rewards
from polopt.prompts import Prompt
from polopt.rollout import SamplingParams
from polopt.rollout.sampler import DynamicSampler

torch.set_num_threads(1)


class ScriptedStream:
    """Stand-in for polopt.prompts.PromptStream: `next_batch()` hands out the scripted batches in
    order (prompt ids are [index]); the batch size is the script's."""

    def __init__(self, batches):
        self.batches = list(batches)
        self.calls = 0

    def next_batch(self):
        self.calls += 1
        batch = self.batches.pop(0)
        return [Prompt(text=f"q{p}", token_ids=[p], answer="right", source="script") for p in batch]


class ScriptedEngine:
    """Each prompt id maps to K (correct, truncated) outcomes; text says which."""

    def __init__(self, outcomes):
        self.outcomes = outcomes
        self.seeds = []

    def generate(self, prompt_ids, num_samples, params):
        self.seeds.append(params.seed)
        return [
            [
                Completion([7] * (j + 1), [-0.5] * (j + 1), truncated=trunc, text="right" if ok else "wrong")
                for j, (ok, trunc) in enumerate(self.outcomes[ids[0]])
            ]
            for ids in prompt_ids
        ]


class WarningRecorder(logging.Handler):
    """Collects polopt.rollout.sampler warnings (caplog is function-scoped, which hypothesis rejects)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.records = []

    def emit(self, record):
        self.records.append(record)

    def __enter__(self):
        logging.getLogger("polopt.rollout.sampler").addHandler(self)

    def __exit__(self, *exc):
        logging.getLogger("polopt.rollout.sampler").removeHandler(self)


def exact_verifier(texts, answers):
    return [float(t == a) for t, a in zip(texts, answers)]


@st.composite
def scenarios(draw):
    K = draw(st.integers(1, 4))
    batch_size = draw(st.integers(1, 5))
    max_gen_batches = draw(st.integers(1, 4))
    outcome = st.tuples(st.booleans(), st.booleans())  # (verifier says right, truncated)
    n_prompts = batch_size * max_gen_batches
    # bias towards all-right / all-wrong groups so the filter has something to drop
    group = st.one_of(
        st.lists(outcome, min_size=K, max_size=K),
        st.just([(True, False)] * K),
        st.just([(False, False)] * K),
    )
    outcomes = {p: draw(group) for p in range(n_prompts)}
    batches = [list(range(b * batch_size, (b + 1) * batch_size)) for b in range(max_gen_batches)]
    return dict(
        K=K, batch_size=batch_size, max_gen_batches=max_gen_batches, outcomes=outcomes, batches=batches,
        num_prompts=draw(st.integers(1, n_prompts + 2)), filter_groups=draw(st.booleans()),
        seed=draw(st.one_of(st.none(), st.integers(0, 1000))),
    )


def expected_selection(s):
    """The specification, written independently: per batch, groups in order, r̂ with truncated =
    wrong, keep 0 < r̂ < 1 (or all), stop after the batch that fills the quota."""
    kept, drawn, batches = [], [], 0
    for batch in s["batches"]:
        if len(kept) >= s["num_prompts"]:
            break
        batches += 1
        for p in batch:
            rewards = [1.0 if ok and not trunc else 0.0 for ok, trunc in s["outcomes"][p]]
            rate = sum(rewards) / len(rewards)
            drawn.append((p, rewards, rate))
            if not s["filter_groups"] or 0 < rate < 1:
                kept.append(p)
    return kept[: s["num_prompts"]], drawn, batches


@given(scenarios())
def test_selection_metrics_and_seeds_follow_the_specification(s):
    engine = ScriptedEngine(s["outcomes"])
    stream = ScriptedStream(s["batches"])
    sampler = DynamicSampler(
        stream, engine, exact_verifier, num_prompts=s["num_prompts"], num_samples=s["K"],
        params=SamplingParams(), max_gen_batches=s["max_gen_batches"], filter_groups=s["filter_groups"],
    )
    warnings = WarningRecorder()
    with warnings:
        groups, metrics = sampler.sample(seed=s["seed"])
    kept, drawn, batches = expected_selection(s)

    assert [g.prompt_ids[0] for g in groups] == kept
    assert len(groups) <= s["num_prompts"]
    assert stream.calls == batches
    assert engine.seeds == ([None] * batches if s["seed"] is None else [s["seed"] + i for i in range(batches)])
    rewards_by_prompt = {p: r for p, r, _ in drawn}
    for g in groups:
        assert g.rewards == rewards_by_prompt[g.prompt_ids[0]]
        assert all(r == 0.0 for r, c in zip(g.rewards, g.completions) if c.truncated)
        if s["filter_groups"]:
            assert 0 < g.correct_rate < 1
    assert bool(warnings.records) == (len(kept) < s["num_prompts"])

    all_rewards = [r for _, rs, _ in drawn for r in rs]
    rates = [rate for _, _, rate in drawn]
    kept_rewards = [r for p in kept for r in rewards_by_prompt[p]]
    completions = [c for p, _, _ in drawn for c in engine.generate([[p]], s["K"], SamplingParams())[0]]
    assert metrics["reward/mean"] == pytest.approx(sum(all_rewards) / len(all_rewards))
    assert metrics["reward/kept_mean"] == pytest.approx(sum(kept_rewards) / len(kept_rewards) if kept_rewards else 0.0)
    assert metrics["filter/all_correct_fraction"] == pytest.approx(sum(r == 1 for r in rates) / len(rates))
    assert metrics["filter/all_wrong_fraction"] == pytest.approx(sum(r == 0 for r in rates) / len(rates))
    assert metrics["filter/kept_fraction"] == pytest.approx(sum(0 < r < 1 for r in rates) / len(rates))
    assert metrics["filter/gen_batches"] == batches
    assert metrics["rollout/num_groups"] == len(kept)
    assert metrics["response/length_mean"] == pytest.approx(sum(len(c.token_ids) for c in completions) / len(completions))
    assert metrics["response/length_max"] == max(len(c.token_ids) for c in completions)
    assert metrics["response/truncation_rate"] == pytest.approx(sum(c.truncated for c in completions) / len(completions))
    assert all(isinstance(v, float) and math.isfinite(v) for v in metrics.values())


def test_scored_rewards_zeroes_truncated_and_checks_lengths():
    done, cut = Completion([1], [0.0], truncated=False), Completion([1], [0.0], truncated=True)
    assert scored_rewards([done, cut, done], [1, 1, 0]) == [1.0, 0.0, 0.0]
    with pytest.raises(ValueError):
        scored_rewards([done], [1.0, 0.0])


def test_the_stream_sets_the_generation_batch():
    stream = ScriptedStream([[0, 1, 2]])
    engine = ScriptedEngine({p: [(True, False), (False, False)] for p in range(3)})
    groups, _ = DynamicSampler(stream, engine, exact_verifier, num_prompts=2, num_samples=2, params=SamplingParams()).sample()
    assert stream.calls == 1 and [g.prompt_ids for g in groups] == [[0], [1]]


def test_sampling_params_are_not_changed_by_sampling():
    # The step's seed is an argument: the sampler's own params stay as constructed.
    params = SamplingParams(max_new_tokens=3)
    engine = ScriptedEngine({p: [(True, False), (False, False)] for p in range(4)})
    sampler = DynamicSampler(ScriptedStream([[0], [1], [2], [3]]), engine, exact_verifier, num_prompts=1,
                             num_samples=2, params=params)
    sampler.sample(seed=5)
    sampler.sample(seed=9)
    assert sampler.params is params and params.seed is None and engine.seeds == [5, 9]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_prompts=0), "num_prompts"),
        (dict(num_samples=1.5), "num_samples"),
        (dict(max_gen_batches=0), "max_gen_batches"),
        (dict(params={"seed": 0}), "SamplingParams"),
    ],
)
def test_bad_configuration(kwargs, match):
    args = dict(num_prompts=2, num_samples=2, params=SamplingParams()) | kwargs
    with pytest.raises((ValueError, TypeError), match=match):
        DynamicSampler(ScriptedStream([]), ScriptedEngine({}), exact_verifier, **args)


def test_bad_prompts_and_verifier_outputs_are_named():
    class DictPrompts(ScriptedStream):
        def next_batch(self):
            return [Prompt(text="", token_ids=[0], answer="right"), {"prompt_ids": [1]}]

    engine = ScriptedEngine({0: [(True, False)], 1: [(False, False)]})
    sampler = DynamicSampler(DictPrompts([]), engine, exact_verifier, num_prompts=2, num_samples=1, params=SamplingParams())
    with pytest.raises(TypeError, match=r"prompt 1 of the batch is a dict"):
        sampler.sample()
    for verifier, match in [(lambda t, a: [1.0], "1 rewards for 2 completions"), (lambda t, a: [2.0, 0.0], "outside")]:
        sampler = DynamicSampler(ScriptedStream([[0, 1]]), engine, verifier, num_prompts=2, num_samples=1, params=SamplingParams())
        with pytest.raises((RuntimeError, ValueError), match=match):
            sampler.sample()


def test_real_native_engine_and_math_verifier():
    """Native engine on a tiny random Qwen2 → text → MathVerifier workers → filter → collate.
    The 'model answer' is the parity of the first sampled token, boxed, so groups come out mixed."""
    from polopt.rollout import NativeRolloutEngine
    from polopt.verify import MathVerifier
    from test_rollout import PAD, STOP_IDS, tiny_model

    decode = lambda ids: f"The answer is \\boxed{{{ids[0] % 2}}}." if ids else ""
    model = tiny_model(seed=2)
    engine = NativeRolloutEngine(model, pad_id=PAD, decode=decode)

    class Stream:
        def __init__(self):
            self.next_id = 10

        def next_batch(self):
            batch = []
            for _ in range(4):
                batch.append(Prompt(text="", token_ids=[self.next_id, self.next_id + 1], answer="1", source="t"))
                self.next_id += 2
            return batch

    with MathVerifier(timeout_s=10.0, num_workers=1) as verifier:
        sampler = DynamicSampler(
            Stream(), engine, verifier, num_prompts=3, num_samples=4,
            params=SamplingParams(max_new_tokens=6, stop_token_ids=STOP_IDS), max_gen_batches=3,
        )
        groups, metrics = sampler.sample(seed=0)
        assert 1 <= len(groups) <= 3 and metrics["rollout/num_groups"] == len(groups)
        for g in groups:
            assert 0 < g.correct_rate < 1
            expected = verifier([c.text for c in g.completions], ["1"] * 4)
            assert g.rewards == scored_rewards(g.completions, expected)
            # untruncated answers end with their stop token, which is not part of the text
            assert g.rewards == [0.0 if c.truncated else float(c.token_ids[:-1][:1] != [] and c.token_ids[0] % 2 == 1) for c in g.completions]
    batch = RolloutBatch.collate(groups, pad_id=PAD)
    assert batch.correct_rate.unique().numel() >= 1 and ((batch.correct_rate > 0) & (batch.correct_rate < 1)).all()
