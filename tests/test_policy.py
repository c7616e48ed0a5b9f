"""polopt.policy.response_logprobs on a tiny torchtune qwen2: fused equals materialised (values,
entropy, gradients), each row equals the same answer run alone without padding, and padding
content never leaks into real tokens."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchtune.models.qwen2 import qwen2

from polopt.batch import Completion, PromptGroup, RolloutBatch
from polopt.policy import output_projection_weight, response_logprobs

VOCAB = 64
PAD = 0


def tiny_qwen2(tied: bool, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = qwen2(vocab_size=VOCAB, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=32,
                  intermediate_dim=64, max_seq_len=128, tie_word_embeddings=tied)
    with torch.no_grad():  # realistic logit scale (HF inits at std 0.02; builder's N(0,1) is peaky)
        model.tok_embeddings.weight.mul_(0.3)
    return model


# Each example runs the model 2-4 times: a third of the profile's examples (25 in CI).
MODEL_EXAMPLES = settings(max_examples=max(25, settings.default.max_examples // 3))

MODELS = {tied: tiny_qwen2(tied) for tied in (True, False)}


@st.composite
def batches(draw) -> RolloutBatch:
    """Groups with ragged prompt lengths (left padding) and ragged responses (incl. empty)."""
    groups = []
    for _ in range(draw(st.integers(1, 3))):
        prompt = draw(st.lists(st.integers(1, VOCAB - 1), min_size=1, max_size=7))
        completions = [
            Completion(ids, [0.0] * len(ids), truncated=False)
            for ids in draw(st.lists(st.lists(st.integers(1, VOCAB - 1), min_size=0, max_size=6), min_size=1, max_size=3))
        ]
        groups.append(PromptGroup(prompt_ids=prompt, answer="", completions=completions, rewards=[0.0] * len(completions)))
    return RolloutBatch.collate(groups, pad_id=PAD)


def logprobs_and_grads(model, batch, **kw):
    model.zero_grad(set_to_none=True)
    logprobs, entropy = response_logprobs(model, batch, return_entropy=True, **kw)
    # A ragged, row-dependent upstream gradient, masked as every loss masks.
    upstream = torch.linspace(-1.0, 2.0, logprobs.numel()).view_as(logprobs) * batch.response_mask
    (logprobs * upstream).sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return logprobs.detach(), entropy, grads


def assert_masked_close(a, b, mask, atol):
    torch.testing.assert_close(a[mask], b[mask], rtol=0, atol=atol)


@MODEL_EXAMPLES
@given(batches(), st.sampled_from([True, False]), st.sampled_from([1.0, 0.7, 1.6]), st.integers(1, 9))
def test_fused_equals_materialised(batch, tied, temperature, chunk_size):
    model = MODELS[tied]
    fused = logprobs_and_grads(model, batch, temperature=temperature, fused=True, chunk_size=chunk_size)
    plain = logprobs_and_grads(model, batch, temperature=temperature, fused=False)
    assert fused[0].shape == (len(batch), batch.response_len) and fused[0].dtype == torch.float32
    # Everywhere, padding included: both paths compute the same raw values.
    torch.testing.assert_close(fused[0], plain[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(fused[1], plain[1], rtol=0, atol=1e-5)
    assert fused[2].keys() == plain[2].keys()
    assert ("tok_embeddings.weight" in fused[2]) and (tied or "output.weight" in fused[2])
    for name in fused[2]:
        torch.testing.assert_close(fused[2][name], plain[2][name], rtol=1e-4, atol=1e-5, msg=name)


def alone(model, prompt, response, temperature):
    """Log-probs of one answer run alone: no padding, default causal mask, positions 0..L-1."""
    tokens = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(tokens)[0, len(prompt) - 1 : -1].double() / temperature
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(response)[:, None]).squeeze(-1)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("tied", [True, False])
def test_each_row_equals_the_answer_run_alone(fused, tied):
    model = MODELS[tied]
    groups = [
        PromptGroup([5, 6, 7], "", [Completion([8, 9, 10, 11], [0.0] * 4, False), Completion([12], [0.0], False)], rewards=[1, 0]),
        PromptGroup([5, 6, 7, 8, 9, 10], "", [Completion([3, 4], [0.0] * 2, False), Completion([13, 14, 15, 16, 17, 18], [0.0] * 6, True)], rewards=[0, 1]),
    ]
    batch = RolloutBatch.collate(groups, pad_id=PAD)
    with torch.no_grad():
        logprobs, entropy = response_logprobs(model, batch, temperature=0.8, fused=fused, return_entropy=True)
    row = 0
    for g in groups:
        for c in g.completions:
            expected = alone(model, g.prompt_ids, c.token_ids, 0.8)
            n = len(c.token_ids)
            torch.testing.assert_close(logprobs[row, :n].double(), expected, rtol=0, atol=2e-5)
            assert entropy[row, :n].min() > 0 and entropy[row, :n].max() <= torch.log(torch.tensor(float(VOCAB))) + 1e-5
            row += 1


@MODEL_EXAMPLES
@given(batches(), st.integers(0, 2**31 - 1))
def test_padding_content_does_not_change_real_tokens(batch, seed):
    model = MODELS[True]
    g = torch.Generator().manual_seed(seed)
    garbage = torch.randint(0, VOCAB, batch.input_ids.shape, generator=g)
    scrambled = RolloutBatch(**{**batch.__dict__, "input_ids": torch.where(batch.attention_mask, batch.input_ids, garbage)})
    with torch.no_grad():
        clean, _ = response_logprobs(model, batch, fused=True, chunk_size=4)
        noisy, _ = response_logprobs(model, scrambled, fused=True, chunk_size=4)
    assert_masked_close(clean, noisy, batch.response_mask, atol=1e-5)


def test_temperature_scales_logits():
    """At τ the log-probs are log_softmax(z/τ): τ→ large flattens towards uniform (−log V)."""
    model = MODELS[False]
    batch = RolloutBatch.collate([PromptGroup([1, 2], "", [Completion([3, 4, 5], [0.0] * 3, False)], rewards=[1])], pad_id=PAD)
    with torch.no_grad():
        cold, cold_h = response_logprobs(model, batch, temperature=0.5, return_entropy=True)
        hot, hot_h = response_logprobs(model, batch, temperature=1000.0, return_entropy=True)
    torch.testing.assert_close(hot, torch.full_like(hot, -torch.log(torch.tensor(float(VOCAB))).item()), rtol=0, atol=1e-3)
    assert (hot_h > cold_h).all()


def test_kv_caches_set_up_for_generation_are_bypassed():
    model = tiny_qwen2(tied=True)
    batch = RolloutBatch.collate([PromptGroup([1, 2, 3], "", [Completion([4, 5], [0.0] * 2, False)], rewards=[1])], pad_id=PAD)
    with torch.no_grad():
        before, _ = response_logprobs(model, batch)
        model.setup_caches(batch_size=1, dtype=torch.float32)
        after, _ = response_logprobs(model, batch)
    assert model.caches_are_enabled()
    torch.testing.assert_close(before, after, rtol=0, atol=0)


def test_return_entropy_false_gives_none_and_model_is_restored():
    model = MODELS[True]
    batch = RolloutBatch.collate([PromptGroup([1, 2], "", [Completion([3], [0.0], False)], rewards=[1])], pad_id=PAD)
    logprobs, entropy = response_logprobs(model, batch)
    assert entropy is None and logprobs.requires_grad
    assert "unembed" not in vars(model)  # the fused hook is gone: plain calls give logits again
    assert model(batch.input_ids).shape == (1, batch.input_ids.shape[1], VOCAB)
    assert output_projection_weight(model) is model.tok_embeddings.weight
    assert output_projection_weight(MODELS[False]) is MODELS[False].output.weight


def test_bad_batches_name_the_field():
    batch = RolloutBatch.collate([PromptGroup([1, 2], "", [Completion([3, 4], [0.0] * 2, False)], rewards=[1])], pad_id=PAD)
    model = MODELS[True]
    with pytest.raises(ValueError, match="prompt_len must be >= 1"):
        response_logprobs(model, RolloutBatch(**{**batch.__dict__, "prompt_len": 0}))
    with pytest.raises(ValueError, match="input_ids is \\[1, 4\\] but prompt_len \\+ response_len = 3 \\+ 2"):
        response_logprobs(model, RolloutBatch(**{**batch.__dict__, "prompt_len": 3}))
    with pytest.raises(ValueError, match="attention_mask \\(1, 3\\) != input_ids \\(1, 4\\)"):
        response_logprobs(model, RolloutBatch(**{**batch.__dict__, "attention_mask": batch.attention_mask[:, :3]}))


def test_output_bias_is_refused_by_the_fused_path():
    model = tiny_qwen2(tied=False)
    model.output = torch.nn.Linear(32, VOCAB, bias=True)
    batch = RolloutBatch.collate([PromptGroup([1, 2], "", [Completion([3], [0.0], False)], rewards=[1])], pad_id=PAD)
    with pytest.raises(NotImplementedError, match="model.output has a bias; use fused=False"):
        response_logprobs(model, batch)
    assert response_logprobs(model, batch, fused=False)[0].shape == (1, 1)


@MODEL_EXAMPLES
@given(batches(), st.sampled_from([True, False]), st.sampled_from([True, False]), st.integers(0, 20))
def test_packed_layout_equals_padded(batch, tied, fused, extra_row_tokens):
    """polopt.packing: each group's prompt once and no padding gives the padded layout's log-probs,
    entropy and gradients, however the groups are laid into rows (max_row_tokens just above the
    widest prompt + answer splits groups across rows; +20 puts several groups in one row)."""
    model = MODELS[tied]
    P = batch.prompt_len
    widest = int((batch.attention_mask[:, :P].sum(1) + batch.attention_mask[:, P:].sum(1)).max())
    padded = logprobs_and_grads(model, batch, fused=fused, chunk_size=3)
    packed = logprobs_and_grads(model, batch, fused=fused, chunk_size=3, pack=True, max_row_tokens=widest + extra_row_tokens)
    assert packed[0].shape == padded[0].shape and torch.isfinite(packed[0]).all()
    assert_masked_close(packed[0], padded[0], batch.response_mask, atol=2e-5)
    assert_masked_close(packed[1], padded[1], batch.response_mask, atol=2e-5)
    assert packed[2].keys() == padded[2].keys()
    for name in padded[2]:
        torch.testing.assert_close(packed[2][name], padded[2][name], rtol=1e-4, atol=2e-5, msg=name)


def test_packing_reads_each_prompt_once_and_drops_padding():
    from polopt.packing import default_row_tokens, pack_groups

    groups = [
        PromptGroup([5, 6, 7], "", [Completion([8, 9], [0.0] * 2, False), Completion([10, 11, 12, 13], [0.0] * 4, False)], rewards=[1, 0]),
        PromptGroup([4], "", [Completion([3], [0.0], False), Completion([], [], False)], rewards=[0, 1]),
    ]
    batch = RolloutBatch.collate(groups, pad_id=PAD)
    packed = pack_groups(batch, max_row_tokens=9)
    assert packed.input_ids.tolist() == [[5, 6, 7, 8, 9, 10, 11, 12, 13], [4, 3, PAD, PAD, PAD, PAD, PAD, PAD, PAD]]
    assert packed.input_pos[0].tolist() == [0, 1, 2, 3, 4, 3, 4, 5, 6]
    # The second answer sees the prompt and itself, never the first answer.
    assert packed.mask[0, 5].tolist() == [True, True, True, False, False, True, False, False, False]
    assert packed.positions[1].tolist() == [2, 5, 6, 7] and packed.rows[3].tolist() == [1, 1, 1, 1]
    # Too narrow for two answers: the group continues in a second row that repeats its prompt.
    assert pack_groups(batch, max_row_tokens=7).input_ids.shape[0] == 3
    # Wide enough for both groups: one row, the second group's segment after the first's, seeing
    # only its own prompt, at its own positions.
    assert default_row_tokens(batch) == 4 * 7  # the widest prompt + answer: 3 + 4
    shared = pack_groups(batch, max_row_tokens=12)
    assert shared.input_ids.tolist() == [[5, 6, 7, 8, 9, 10, 11, 12, 13, 4, 3]]
    assert shared.input_pos[0].tolist() == [0, 1, 2, 3, 4, 3, 4, 5, 6, 0, 1]
    assert shared.mask[0, 10].tolist() == [False] * 9 + [True, True]
    assert shared.positions[1].tolist() == [2, 5, 6, 7] and shared.positions[2].tolist() == [9, 9, 9, 9]
    assert shared.rows.unique().tolist() == [0]
    with pytest.raises(ValueError, match="max_row_tokens=6"):
        pack_groups(batch, max_row_tokens=6)
    mixed = RolloutBatch(**{**batch.__dict__, "group_ids": torch.zeros(4, dtype=torch.long)})
    with pytest.raises(ValueError, match="different prompt"):
        pack_groups(mixed, max_row_tokens=32)
