"""Per-token log-probs through the output projection without materialising [N, V] logits.

    log π(y_n | ·) = z_n[y_n] − logsumexp(z_n),   z_n = (h_n · Wᵀ) / τ

Every polopt loss is a function of these per-token log-probs, so one fused op serves all of them
(Liger-Kernel's fused losses fuse the loss itself and exist only for the GRPO family).

Forward walks the N rows in chunks of `chunk_size`, keeping only logsumexp [N] (fp32). Backward
recomputes each chunk's logits and, with g_n the incoming gradient,

    ∂/∂z_n = g_n · (onehot(y_n) − softmax(z_n))          (then ·1/τ for the projection)
    ∂h_n   = (∂/∂z_n / τ) · W,      ∂W += (∂/∂z_n / τ)ᵀ · h_n

so at most chunk_size × V logits exist at any time, forward or backward. The price is one extra
matmul (the recompute): 4 [N, D, V] matmuls instead of 3.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.autograd.function import once_differentiable

__all__ = ["token_logprobs", "probs_from_logprobs_"]


def _compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """Softmax math in fp32, or float64 when an input is float64 (the exactness tests need it)."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


# Probabilities below e^-60 (~1e-26) are taken as exactly 0 in the softmax: the values this changes
# are far below fp32's and fp64's resolution of anything they are summed with, and on CPU both exp
# of inputs below ~-87 (fp32 underflow) and arithmetic on the subnormals it returns take a slow path,
# which a peaked softmax (a trained model) hits on most of the vocabulary.
_NEGLIGIBLE_LOG_PROB = -60.0


def probs_from_logprobs_(logprobs: torch.Tensor) -> torch.Tensor:
    """exp(logprobs) in place for normalised log-probs (z − logsumexp(z) ≤ 0), with probabilities
    below e^-60 set to exactly 0."""
    negligible = logprobs < _NEGLIGIBLE_LOG_PROB
    return logprobs.clamp_(min=_NEGLIGIBLE_LOG_PROB).exp_().masked_fill_(negligible, 0.0)


def _chunk_logits(hidden_chunk: torch.Tensor, weight: torch.Tensor, inv_temperature: float, dtype: torch.dtype) -> torch.Tensor:
    """z = (h · Wᵀ) / τ for one chunk, in the compute dtype (matmul in the input dtype)."""
    logits = hidden_chunk @ weight.t()
    logits = logits.to(dtype)  # no copy when already `dtype`
    if inv_temperature != 1.0:
        logits.mul_(inv_temperature)
    return logits


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, inv_temperature, chunk_size, return_entropy, lead_shape):
        # Outputs are allocated in their final shape and filled through flat views: returning a
        # view would defeat FSDP2's pre-backward hook on module outputs.
        dtype = _compute_dtype(hidden.dtype, weight.dtype)
        n = hidden.shape[0]
        logprobs_out = torch.empty(lead_shape, dtype=dtype, device=hidden.device)
        logprobs = logprobs_out.view(-1)
        logsumexp = torch.empty(n, dtype=dtype, device=hidden.device)
        entropy_out = torch.empty(lead_shape, dtype=dtype, device=hidden.device) if return_entropy else None
        entropy = entropy_out.view(-1) if return_entropy else None
        for start in range(0, n, chunk_size):
            rows = slice(start, start + chunk_size)
            logits = _chunk_logits(hidden[rows], weight, inv_temperature, dtype)
            lse = torch.logsumexp(logits, dim=-1)
            logsumexp[rows] = lse
            logprobs[rows] = logits.gather(1, targets[rows, None]).squeeze(1) - lse
            if return_entropy:
                # H = −Σ p·(z − lse): every term ≥ 0, no cancellation of lse against Σ p·z.
                shifted = logits.sub_(lse[:, None])
                entropy[rows] = -probs_from_logprobs_(shifted.clone()).mul_(shifted).sum(-1)
            del logits
        ctx.save_for_backward(hidden, weight, targets, logsumexp)
        ctx.inv_temperature = inv_temperature
        ctx.chunk_size = chunk_size
        if return_entropy:
            ctx.mark_non_differentiable(entropy_out)
        return logprobs_out, entropy_out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logprobs, _grad_entropy):
        hidden, weight, targets, logsumexp = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if grad_logprobs is None or not (need_hidden or need_weight):
            return None, None, None, None, None, None, None
        dtype = logsumexp.dtype
        inv_t = ctx.inv_temperature
        n = hidden.shape[0]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        # Accumulate ∂W over chunks in the compute dtype: summing many bf16 partials loses bits.
        grad_weight = torch.zeros(weight.shape, dtype=dtype, device=weight.device) if need_weight else None
        # g/τ folds the projection's 1/τ into the per-row weight once.
        scaled_grad = grad_logprobs.reshape(-1).to(dtype) * inv_t
        for start in range(0, n, ctx.chunk_size):
            rows = slice(start, start + ctx.chunk_size)
            g = scaled_grad[rows]
            grad_logits = _chunk_logits(hidden[rows], weight, inv_t, dtype)
            # softmax in place, then ∂z = g·(onehot − p)
            probs_from_logprobs_(grad_logits.sub_(logsumexp[rows, None])).mul_(-g[:, None])
            grad_logits.scatter_add_(1, targets[rows, None], g[:, None])
            grad_logits = grad_logits.to(hidden.dtype)
            if need_hidden:
                grad_hidden[rows] = grad_logits @ weight
            if need_weight:
                if grad_weight.dtype == hidden.dtype:
                    grad_weight.addmm_(grad_logits.t(), hidden[rows])
                else:
                    grad_weight.add_(grad_logits.t() @ hidden[rows])
            del grad_logits
        if need_weight:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None, None


def _check_inputs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float, chunk_size: int) -> None:
    if not isinstance(hidden, torch.Tensor) or hidden.dim() < 1:
        raise ValueError(f"token_logprobs: hidden must be a tensor [..., D], got {getattr(hidden, 'shape', type(hidden))}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"token_logprobs: weight must be [V, D], got shape {tuple(getattr(weight, 'shape', ()))}")
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"token_logprobs: hidden's last dim {hidden.shape[-1]} != weight's dim 1 ({weight.shape[1]}); "
            f"hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)} (weight is [V, D])"
        )
    if not hidden.is_floating_point() or hidden.dtype != weight.dtype:
        raise ValueError(f"token_logprobs: hidden ({hidden.dtype}) and weight ({weight.dtype}) must share one floating dtype")
    if not isinstance(targets, torch.Tensor) or targets.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise ValueError(f"token_logprobs: targets must be an integer tensor, got {getattr(targets, 'dtype', type(targets))}")
    if hidden.device != weight.device or targets.device != hidden.device:
        raise ValueError(
            f"token_logprobs: hidden ({hidden.device}), weight ({weight.device}), targets ({targets.device}) must be on one device"
        )
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(
            f"token_logprobs: targets shape {tuple(targets.shape)} must equal hidden's leading shape {tuple(hidden.shape[:-1])}"
        )
    vocab = weight.shape[0]
    if targets.numel() and bool(((targets < 0) | (targets >= vocab)).any()):
        bad = targets[(targets < 0) | (targets >= vocab)]
        raise ValueError(f"token_logprobs: targets must lie in [0, {vocab}) (V = weight.shape[0]); got e.g. {bad[:5].tolist()}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"token_logprobs: chunk_size must be an int >= 1, got {chunk_size!r}")
    if not (isinstance(temperature, (int, float)) and temperature > 0 and temperature != float("inf")):
        raise ValueError(f"token_logprobs: temperature must be a finite number > 0, got {temperature!r}")


def token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    return_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log_softmax(hidden · weightᵀ / temperature)[targets], chunked over rows.

    Args:
        hidden: [..., D] final hidden states (after the final norm), grads flow to it.
        weight: [V, D] output projection (an nn.Linear's weight, or the tied embedding), grads flow
            to it and accumulate with any other use of the same tensor (tied embeddings).
        targets: [...] token ids in [0, V). Padding ids are fine: the caller masks the result.
        temperature: sampling temperature τ > 0 the log-probs are taken at.
        chunk_size: rows whose [chunk_size, V] logits may exist at once (forward and backward).
        return_entropy: also return the per-token entropy of softmax(z), without gradient.

    Returns:
        log-probs [...] in fp32 (float64 if an input is float64), and with `return_entropy` a
        tuple (log-probs, entropy).
    """
    _check_inputs(hidden, weight, targets, temperature, chunk_size)
    lead_shape = hidden.shape[:-1]
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_targets = targets.reshape(-1).long()
    logprobs, entropy = _TokenLogprobs.apply(
        flat_hidden, weight, flat_targets, 1.0 / float(temperature), chunk_size, return_entropy, lead_shape
    )
    return (logprobs, entropy) if return_entropy else logprobs


def materialized_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The same quantity the plain way (all [..., V] logits at once): the reference and baseline."""
    dtype = _compute_dtype(hidden.dtype, weight.dtype)
    logits = (hidden @ weight.t()).to(dtype) / temperature
    return logprobs_from_logits(logits, targets, return_entropy=return_entropy)


def logprobs_from_logits(
    logits: torch.Tensor, targets: torch.Tensor, *, return_entropy: bool = False
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log_softmax(logits)[targets] in fp32 (or wider), optionally with the entropy (no grad)."""
    logits = logits.to(_compute_dtype(logits.dtype))
    log_probs = torch.log_softmax(logits, dim=-1)
    picked = log_probs.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
    if not return_entropy:
        return picked
    with torch.no_grad():
        entropy = -(log_probs.exp() * log_probs).sum(-1)
    return picked, entropy
