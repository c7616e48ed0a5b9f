"""The native rollout engine on a tiny real torchtune Qwen2 (fp32, CPU); the vLLM engine runs
against real vLLM in tests/test_vllm_engine.py.

The central property: the log-probs the native engine reports are the ones the trainer recomputes
on the collated RolloutBatch (≤ 1e-5), so the on-policy ratio is exactly 1.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchtune.generation import get_causal_mask_from_padding_mask, get_position_ids_from_padding_mask
from torchtune.models.qwen2 import qwen2

from polopt.batch import PromptGroup, RolloutBatch
from polopt.rollout import NativeRolloutEngine, SamplingParams
from polopt.rollout.native import sample_tokens

torch.set_num_threads(1)

VOCAB, PAD = 64, 0
STD = 0.2  # logits of a realistic scale: fp32 rounding stays well under 1e-5 (0.4 reaches ~1.3e-5)
STOP_IDS = [3, 4, 5, 6]  # a few stop ids so that answers of the random model end at varied lengths


def tiny_model(seed: int = 0, tied: bool = True) -> torch.nn.Module:
    """Tiny random Qwen2; weights ~N(0, STD²) so the next-token distribution is neither uniform
    nor one-hot (torchtune's default init with tied embeddings repeats the last token forever)."""
    torch.manual_seed(seed)
    model = qwen2(
        vocab_size=VOCAB, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=32,
        intermediate_dim=64, max_seq_len=128, tie_word_embeddings=tied,
    )
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, STD)
    return model


def decode(ids: list[int]) -> str:
    return " ".join(f"t{i}" for i in ids)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def engine(model, **kwargs) -> NativeRolloutEngine:
    return NativeRolloutEngine(model, pad_id=PAD, decode=decode, **kwargs)


prompt_lists = st.lists(
    st.lists(st.integers(7, VOCAB - 1), min_size=1, max_size=9), min_size=1, max_size=4
)


def recompute_logprobs(model, batch: RolloutBatch, temperature: float) -> torch.Tensor:
    """The trainer's view, written out: a plain forward on the collated batch with positions and
    mask from the padding mask; log-prob of response token t at logits position P − 1 + t."""
    mask = batch.attention_mask
    with torch.no_grad():
        logits = model(
            batch.input_ids,
            input_pos=get_position_ids_from_padding_mask(mask),
            mask=get_causal_mask_from_padding_mask(mask),
        )
    P, T = batch.prompt_len, batch.response_len
    logprobs = torch.log_softmax(logits[:, P - 1 : P - 1 + T].float() / temperature, dim=-1)
    targets = batch.input_ids[:, P : P + T]
    return logprobs.gather(-1, targets[..., None]).squeeze(-1) * batch.response_mask


def collate(prompts, groups) -> RolloutBatch:
    prompt_groups = [
        PromptGroup(prompt_ids=p, answer="", completions=g, rewards=[0.0] * len(g)) for p, g in zip(prompts, groups)
    ]
    return RolloutBatch.collate(prompt_groups, pad_id=PAD)


# ---------------------------------------------------------------- SamplingParams


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": 0}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ],
)
def test_sampling_params_rejects_bad_values_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"SamplingParams.{field}"):
        SamplingParams(**kwargs)


def test_sampling_params_replace_and_config_lists():
    params = SamplingParams(temperature=0.7, stop_token_ids=(3, 4))
    assert params.stop_token_ids == [3, 4] and isinstance(params.stop_token_ids, list)
    seeded = dataclasses.replace(params, seed=5)
    assert seeded.seed == 5 and seeded.temperature == 0.7 and params.seed is None
    with pytest.raises(ValueError, match="top_p"):
        dataclasses.replace(params, top_p=2.0)


# ---------------------------------------------------------------- native engine


@settings(max_examples=12)
@given(
    prompts=prompt_lists,
    num_samples=st.integers(1, 3),
    temperature=st.sampled_from([1.0, 0.6, 1.7]),
    top_p=st.sampled_from([1.0, 0.8]),
    top_k=st.sampled_from([None, 5]),
    seed=st.integers(0, 2**31 - 1),
)
def test_reported_logprobs_equal_trainer_recompute(model, prompts, num_samples, temperature, top_p, top_k, seed):
    params = SamplingParams(
        temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=12, stop_token_ids=STOP_IDS, seed=seed
    )
    groups = engine(model).generate(prompts, num_samples, params)
    batch = collate(prompts, groups)
    recomputed = recompute_logprobs(model, batch, temperature)
    torch.testing.assert_close(recomputed, batch.old_logprobs, atol=1e-5, rtol=0)
    from polopt.policy import response_logprobs

    for fused in (False, True):
        with torch.no_grad():
            trainer, _ = response_logprobs(model, batch, temperature=temperature, fused=fused)
        torch.testing.assert_close(trainer * batch.response_mask, batch.old_logprobs, atol=1e-5, rtol=0)


@settings(max_examples=8)
@given(prompts=prompt_lists, num_samples=st.integers(1, 4), seed=st.integers(0, 2**31 - 1))
def test_shared_prefill_matches_per_sample_prefill(model, prompts, num_samples, seed):
    # The random draws are the same [B, V] block per step in both modes, so tokens must agree exactly.
    params = SamplingParams(max_new_tokens=10, stop_token_ids=STOP_IDS, seed=seed)
    shared = engine(model, shared_prefill=True).generate(prompts, num_samples, params)
    separate = engine(model, shared_prefill=False).generate(prompts, num_samples, params)
    for g_shared, g_separate in zip(shared, separate):
        for a, b in zip(g_shared, g_separate):
            assert a.token_ids == b.token_ids and a.truncated == b.truncated
            torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=0)


def generate_retiring(model, prompts, num_samples, params, *, fraction: float, shared: bool):
    """(answers, number of retirements) with `RETIRE_FRACTION` set to `fraction` for the call."""
    from polopt.rollout import native

    retired = []
    keep_prefixes = native._PrefixSharedKVCache.keep_prefixes
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(native, "RETIRE_FRACTION", fraction)
        mp.setattr(native._PrefixSharedKVCache, "keep_prefixes", lambda self, keep, rows: retired.append(1) or keep_prefixes(self, keep, rows))
        groups = engine(model, shared_prefill=shared).generate(prompts, num_samples, params)
    return groups, len(retired)


def assert_same_answers(groups_a, groups_b):
    for g_a, g_b in zip(groups_a, groups_b, strict=True):
        for a, b in zip(g_a, g_b, strict=True):
            assert a.token_ids == b.token_ids and a.truncated == b.truncated
            torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=0)


@settings(max_examples=8)
@given(prompts=prompt_lists, num_samples=st.integers(1, 3), seed=st.integers(0, 2**31 - 1))
def test_retiring_finished_prompts_changes_no_answer(model, prompts, num_samples, seed):
    # Retire whenever a prefix is done vs never, with and without shared prefill: same answers.
    params = SamplingParams(max_new_tokens=12, stop_token_ids=STOP_IDS, seed=seed)
    never, _ = generate_retiring(model, prompts, num_samples, params, fraction=2.0, shared=True)
    for shared in (True, False):
        eager, _ = generate_retiring(model, prompts, num_samples, params, fraction=0.0, shared=shared)
        assert_same_answers(never, eager)


def test_retirement_happens_and_shrinks_the_batch(model):
    # Long answers over many prompts: some prompts finish early, and the default fraction retires them.
    prompts = [[p, p + 2] for p in range(7, 47, 4)]
    params = SamplingParams(max_new_tokens=40, stop_token_ids=STOP_IDS, seed=0)
    default, retirements = generate_retiring(model, prompts, 3, params, fraction=0.25, shared=True)
    never, none = generate_retiring(model, prompts, 3, params, fraction=2.0, shared=True)
    assert retirements >= 1 and none == 0
    assert_same_answers(never, default)


def greedy_reference(model, prompt: list[int], steps: int) -> list[int]:
    """Greedy decoding the slow way: a full forward without caches for every new token."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt) :]


@settings(max_examples=6)
@given(prompts=prompt_lists)
def test_top_k_1_is_greedy_and_batch_composition_does_not_matter(model, prompts):
    params = SamplingParams(top_k=1, max_new_tokens=8, seed=0)
    together = engine(model).generate(prompts, 2, params)
    for prompt, group in zip(prompts, together):
        expected = greedy_reference(model, prompt, 8)
        alone = engine(model).generate([prompt], 1, params)[0][0]
        for completion in group:
            assert completion.token_ids == expected
            torch.testing.assert_close(
                torch.tensor(completion.logprobs), torch.tensor(alone.logprobs), atol=1e-5, rtol=0
            )


def test_chunked_generation_equals_one_batch(model):
    prompts = [[10, 11, 12], [20], [30, 31, 32, 33, 34], [40, 41]]
    params = SamplingParams(top_k=1, max_new_tokens=6, stop_token_ids=STOP_IDS)
    whole = engine(model).generate(prompts, 3, params)
    chunked = engine(model, max_batch_size=4).generate(prompts, 3, params)  # one prompt × 3 per chunk
    assert [[c.token_ids for c in g] for g in whole] == [[c.token_ids for c in g] for g in chunked]


def test_stop_tokens_end_answers_and_truncation_flags(model):
    prompts = [[p, p + 1] for p in range(7, 40, 3)]
    params = SamplingParams(max_new_tokens=15, stop_token_ids=STOP_IDS, seed=3)
    groups = engine(model).generate(prompts, 4, params)
    stopped = truncated = 0
    for group in groups:
        assert len(group) == 4
        for c in group:
            assert len(c.token_ids) == len(c.logprobs) >= 1
            assert not any(t in STOP_IDS for t in c.token_ids[:-1]), "generation went on after a stop token"
            if c.truncated:
                truncated += 1
                assert len(c.token_ids) == 15 and c.token_ids[-1] not in STOP_IDS
            else:
                stopped += 1
                assert c.token_ids[-1] in STOP_IDS
                assert c.text == decode(c.token_ids[:-1]), "the stop token must not be in the text"
    assert stopped and truncated, "the test needs both kinds of answers to mean anything"


def test_no_stop_tokens_truncates_everything(model):
    groups = engine(model).generate([[9, 10, 11]], 3, SamplingParams(max_new_tokens=3, seed=1))
    for c in groups[0]:
        assert c.truncated and len(c.token_ids) == 3 and c.text == decode(c.token_ids)


def test_same_seed_same_answers_other_seed_other_answers(model):
    prompts = [[12, 13, 14], [15]]
    run = lambda seed: engine(model).generate(prompts, 4, SamplingParams(max_new_tokens=10, seed=seed))
    ids = lambda groups: [[c.token_ids for c in g] for g in groups]
    assert ids(run(7)) == ids(run(7))
    assert ids(run(7)) != ids(run(8))


def test_model_state_is_restored_for_training(model):
    x = torch.tensor([[10, 11, 12, 13]])
    with torch.no_grad():
        before = model(x)
    attention = [layer.attn for layer in model.layers]
    calls = [a._attention_call for a in attention]
    for mode in (True, False):
        model.train(mode)
        engine(model).generate([[10, 11]], 2, SamplingParams(max_new_tokens=4, seed=0))
        assert model.training is mode
        assert not model.caches_are_setup() and not model.caches_are_enabled()
        assert [a.num_kv_heads for a in attention] == [2, 2]  # grouped-query decode undone
        assert [a._attention_call for a in attention] == calls
    with torch.no_grad():
        torch.testing.assert_close(model(x), before)
    out = model(x).sum()  # a training forward/backward works after generation
    out.backward()
    model.zero_grad(set_to_none=True)


def test_sync_weights_loads_a_different_state_dict(model):
    other = tiny_model(seed=1)
    rollout_model = tiny_model(seed=0)
    eng = engine(rollout_model)
    params = SamplingParams(top_k=1, max_new_tokens=5)
    eng.sync_weights(other.state_dict())
    assert eng.generate([[10, 11]], 1, params)[0][0].token_ids == greedy_reference(other, [10, 11], 5)
    eng.sync_weights(rollout_model.state_dict())  # its own tensors: nothing to do, nothing breaks


@pytest.mark.parametrize(
    "prompts, num_samples, params, match",
    [
        ([[1, 2], []], 2, SamplingParams(), r"prompt_ids\[1\] is empty"),
        ([[1, 200]], 2, SamplingParams(), r"prompt_ids\[0\] has token ids outside \[0, 64\)"),
        ([[1] * 100], 1, SamplingParams(max_new_tokens=40), "exceeds the model's max_seq_len"),
        ([[1, 2]], 0, SamplingParams(), "num_samples"),
    ],
)
def test_bad_generate_input(model, prompts, num_samples, params, match):
    with pytest.raises(ValueError, match=match):
        engine(model).generate(prompts, num_samples, params)


def test_sampler_frequencies_follow_truncated_distribution():
    """argmax(p / Exp(1)) with top-k and top-p draws from the renormalised truncated distribution."""
    logits = torch.log(torch.tensor([0.4, 0.25, 0.15, 0.1, 0.06, 0.04]))
    rows = 40_000
    generator = torch.Generator().manual_seed(0)

    def freqs(**kw):
        tokens, logprobs = sample_tokens(logits.expand(rows, -1), SamplingParams(**kw), generator)
        full = torch.log_softmax(logits / kw.get("temperature", 1.0), -1)
        torch.testing.assert_close(logprobs, full[tokens])  # reported = full distribution, not truncated
        return torch.bincount(tokens, minlength=6).float() / rows

    probs = logits.softmax(-1)
    torch.testing.assert_close(freqs(), probs, atol=0.01, rtol=0)
    top3 = torch.cat([probs[:3] / probs[:3].sum(), torch.zeros(3)])
    torch.testing.assert_close(freqs(top_k=3), top3, atol=0.01, rtol=0)
    # top_p=0.6: smallest prefix with mass >= 0.6 is {0, 1} (0.65).
    top2 = torch.cat([probs[:2] / probs[:2].sum(), torch.zeros(4)])
    torch.testing.assert_close(freqs(top_p=0.6), top2, atol=0.01, rtol=0)
    hot = (logits / 0.5).softmax(-1)
    torch.testing.assert_close(freqs(temperature=0.5), hot, atol=0.01, rtol=0)
