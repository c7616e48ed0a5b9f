"""Kernels for the trainer's hot path (pure torch, CPU and GPU)."""

from polopt.ops.token_logprobs import (
    logprobs_from_logits,
    materialized_token_logprobs,
    probs_from_logprobs_,
    token_logprobs,
)

__all__ = ["token_logprobs", "materialized_token_logprobs", "logprobs_from_logits", "probs_from_logprobs_"]
