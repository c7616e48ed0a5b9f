"""polopt.ops.token_logprobs equals the materialised log_softmax, in value and gradient, while
never creating a tensor as large as [N, V] (forward or backward)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from polopt.ops import materialized_token_logprobs, token_logprobs


@st.composite
def problems(draw, dtype=torch.float64):
    """Random lead shape (1-3 dims, possibly empty rows), D, V, chunk sizes that may not divide N,
    temperature, and targets (including the extremes 0 and V-1)."""
    lead = tuple(draw(st.lists(st.integers(1, 6), min_size=1, max_size=3)))
    dim = draw(st.integers(1, 12))
    vocab = draw(st.integers(2, 40))
    n = 1
    for s in lead:
        n *= s
    chunk_size = draw(st.integers(1, n + 3))
    temperature = draw(st.sampled_from([1.0, 0.6, 1.3, 0.05, 7.0]))
    scale = draw(st.sampled_from([0.1, 1.0, 5.0]))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*lead, dim, generator=g, dtype=dtype) * scale
    weight = torch.randn(vocab, dim, generator=g, dtype=dtype)
    targets = torch.randint(0, vocab, lead, generator=g)
    targets.view(-1)[0] = draw(st.sampled_from([0, vocab - 1, int(targets.view(-1)[0])]))
    return hidden, weight, targets, temperature, chunk_size


def values_and_grads(fn, hidden, weight, targets, upstream, **kw):
    h = hidden.detach().clone().requires_grad_(True)
    w = weight.detach().clone().requires_grad_(True)
    logprobs, entropy = fn(h, w, targets, return_entropy=True, **kw)
    gh, gw = torch.autograd.grad(logprobs, (h, w), upstream)
    return logprobs.detach(), entropy, gh, gw


@given(problems())
def test_float64_equals_materialised(problem):
    hidden, weight, targets, temperature, chunk_size = problem
    upstream = torch.randn(targets.shape, dtype=torch.float64)
    fused = values_and_grads(token_logprobs, hidden, weight, targets, upstream, temperature=temperature, chunk_size=chunk_size)
    ref = values_and_grads(materialized_token_logprobs, hidden, weight, targets, upstream, temperature=temperature)
    for name, a, b in zip(["logprobs", "entropy", "grad_hidden", "grad_weight"], fused, ref):
        assert a.dtype == torch.float64 and a.shape == b.shape, name
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10, msg=name)
    assert (fused[0] <= 1e-12).all()


@given(problems(dtype=torch.float32))
def test_float32_close_to_float64_reference(problem):
    hidden, weight, targets, temperature, chunk_size = problem
    upstream = torch.randn(targets.shape, dtype=torch.float64)
    fused = values_and_grads(token_logprobs, hidden, weight, targets, upstream.float(), temperature=temperature, chunk_size=chunk_size)
    ref = values_and_grads(materialized_token_logprobs, hidden.double(), weight.double(), targets, upstream, temperature=temperature)
    logit_size = (hidden.double() @ weight.double().t() / temperature).abs().max().item()
    for name, a, b in zip(["logprobs", "entropy", "grad_hidden", "grad_weight"], fused, ref):
        assert a.dtype == torch.float32, name
        # fp32 can do no better than eps·|z| on log-probs of logits z: scale by the logit size.
        scale = max(1.0, logit_size, b.abs().max().item() if b.numel() else 0.0)
        torch.testing.assert_close(a.double(), b, rtol=0, atol=1e-5 * scale, msg=name)


def test_bfloat16_inputs_compute_in_float32():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 16, generator=g)
    weight = torch.randn(300, 16, generator=g) * 0.3
    targets = torch.randint(0, 300, (37,), generator=g)
    upstream = torch.randn(37, generator=g)
    fused = values_and_grads(token_logprobs, hidden.bfloat16(), weight.bfloat16(), targets, upstream, chunk_size=8)
    # Reference: the same bf16-rounded inputs, everything else in float64.
    ref = values_and_grads(materialized_token_logprobs, hidden.bfloat16().double(), weight.bfloat16().double(), targets, upstream.double())
    assert fused[0].dtype == torch.float32 and fused[1].dtype == torch.float32
    assert fused[2].dtype == torch.bfloat16 and fused[3].dtype == torch.bfloat16
    torch.testing.assert_close(fused[0].double(), ref[0], rtol=0, atol=0.05)  # bf16 matmul output rounding
    torch.testing.assert_close(fused[1].double(), ref[1], rtol=0, atol=0.05)
    for a, b in zip(fused[2:], ref[2:]):
        torch.testing.assert_close(a.double(), b, rtol=0.02, atol=0.02)


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(7, 4, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 7, (2, 3), generator=g)
    fn = lambda h, w: token_logprobs(h, w, targets, temperature=0.7, chunk_size=4)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (hidden, weight))
    # Double backward would be silently wrong through the recompute: it must refuse instead.
    with pytest.raises(RuntimeError, match="does not require grad|once_differentiable"):
        out = fn(hidden, weight).sum()
        (gh,) = torch.autograd.grad(out, hidden, create_graph=True)
        gh.sum().backward()


def test_tied_weight_accumulates_with_embedding_grad():
    """Weight shared with an embedding: its grad is the sum of both uses, as with plain matmul."""
    g = torch.Generator().manual_seed(2)
    emb = torch.nn.Embedding(11, 6, dtype=torch.float64)
    torch.nn.init.normal_(emb.weight, generator=g)
    tokens = torch.randint(0, 11, (3, 5), generator=g)
    targets = torch.randint(0, 11, (3, 5), generator=g)
    lin = torch.nn.Linear(6, 6, dtype=torch.float64)

    def grads(fn, **kw):
        emb.zero_grad()
        lin.zero_grad()
        hidden = torch.tanh(lin(emb(tokens)))
        fn(hidden, emb.weight, targets, **kw).sum().backward()
        return emb.weight.grad.clone(), lin.weight.grad.clone()

    fused = grads(token_logprobs, chunk_size=4, temperature=0.9)
    ref = grads(materialized_token_logprobs, temperature=0.9)
    for a, b in zip(fused, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    # Both uses contribute: the embedding-only grad differs from the total.
    emb.zero_grad()
    lin.zero_grad()
    token_logprobs(torch.tanh(lin(emb(tokens))), emb.weight.detach(), targets).sum().backward()
    assert not torch.allclose(emb.weight.grad, fused[0])


def test_frozen_weight_or_hidden_get_no_grad():
    hidden = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(9, 4, dtype=torch.float64)
    targets = torch.randint(0, 9, (5,))
    token_logprobs(hidden, weight, targets, chunk_size=2).sum().backward()
    ref_h = hidden.detach().clone().requires_grad_(True)
    materialized_token_logprobs(ref_h, weight, targets).sum().backward()
    torch.testing.assert_close(hidden.grad, ref_h.grad, rtol=0, atol=1e-12)
    assert weight.grad is None


class LargestTensor(TorchDispatchMode):
    """Records the most elements any op output had (the memory-shaped property of the op)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("return_entropy", [False, True])
def test_never_holds_more_than_chunk_by_vocab_logits(return_entropy):
    N, D, V, chunk = 96, 8, 500, 16
    hidden = torch.randn(N, D, requires_grad=True)
    weight = torch.randn(V, D, requires_grad=True)
    targets = torch.randint(0, V, (N,))
    bound = max(chunk * V, V * D, N * D)
    for fn, kw, within in [(token_logprobs, {"chunk_size": chunk}, True), (materialized_token_logprobs, {}, False)]:
        with LargestTensor() as probe:
            out = fn(hidden, weight, targets, return_entropy=return_entropy, **kw)
            logprobs = out[0] if return_entropy else out
            logprobs.sum().backward()
        assert (probe.largest <= bound) == within, (fn.__name__, probe.largest, bound)


def test_empty_input():
    hidden = torch.randn(0, 3, 4, requires_grad=True)
    weight = torch.randn(5, 4, requires_grad=True)
    lp, ent = token_logprobs(hidden, weight, torch.zeros(0, 3, dtype=torch.long), return_entropy=True)
    assert lp.shape == (0, 3) and ent.shape == (0, 3)
    lp.sum().backward()
    assert torch.equal(weight.grad, torch.zeros_like(weight))


@pytest.mark.parametrize(
    "hidden_shape, weight_shape, targets, kwargs, match",
    [
        ((4, 8), (10, 7), [0, 1, 2, 3], {}, "hidden's last dim 8 != weight's dim 1"),
        ((4, 8), (10, 8, 1), [0, 1, 2, 3], {}, "weight must be \\[V, D\\]"),
        ((4, 8), (10, 8), [0, 1, 2], {}, "targets shape \\(3,\\) must equal hidden's leading shape \\(4,\\)"),
        ((4, 8), (10, 8), [0, 1, 2, 10], {}, "targets must lie in \\[0, 10\\).*\\[10\\]"),
        ((4, 8), (10, 8), [0, -1, 2, 3], {}, "targets must lie in \\[0, 10\\).*\\[-1\\]"),
        ((4, 8), (10, 8), [0, 1, 2, 3], {"chunk_size": 0}, "chunk_size must be an int >= 1, got 0"),
        ((4, 8), (10, 8), [0, 1, 2, 3], {"chunk_size": 2.5}, "chunk_size must be an int >= 1"),
        ((4, 8), (10, 8), [0, 1, 2, 3], {"temperature": 0.0}, "temperature must be a finite number > 0"),
        ((4, 8), (10, 8), [0.0, 1.0, 2.0, 3.0], {}, "targets must be an integer tensor"),
    ],
)
def test_bad_input_names_the_argument(hidden_shape, weight_shape, targets, kwargs, match):
    with pytest.raises(ValueError, match=match):
        token_logprobs(torch.randn(hidden_shape), torch.randn(weight_shape), torch.tensor(targets), **kwargs)


def test_mixed_dtypes_rejected():
    with pytest.raises(ValueError, match="hidden \\(torch.bfloat16\\) and weight \\(torch.float32\\)"):
        token_logprobs(torch.randn(2, 4).bfloat16(), torch.randn(5, 4), torch.tensor([0, 1]))
