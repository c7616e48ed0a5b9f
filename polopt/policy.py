"""The trainer's log-probs of a RolloutBatch's response tokens.

    logprobs[b, t] = log π_θ(a_t | q, a_<t) / at temperature τ  =  log_softmax(z / τ)[a_t]

read at logits position P − 1 + t (see polopt/batch.py for the layout). Positions and the causal
mask come from torchtune's padding-mask helpers, exactly as the rollout engine builds them at
generation, so the first real prompt token has position 0 whatever the left padding.

`fused=True` runs the model to its final hidden states, keeps only the T response positions, and
projects them inside polopt.ops.token_logprobs (no [B, S, V] logits; prompt positions are never
projected). The projection runs *inside the forward of the module that owns the output weight*
(the root TransformerDecoder, through its `unembed` step), because under FSDP2 that weight is a
sharded DTensor everywhere else: inside the forward it is the gathered full tensor and its
gradient is reduce-scattered back to the shard by FSDP's own hooks.

`fused=False` materialises the logits the plain way (the reference; same values to ~1e-6 fp32).

`pack=True` runs the model on polopt.packing's layout instead: each group's prompt once and the
answers back to back, no padding, with a block mask; the T predicting positions of each row are
gathered from it, and the rest is the same.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import nn
from torchtune.generation import get_causal_mask_from_padding_mask, get_position_ids_from_padding_mask
from torchtune.modules import TiedLinear, TransformerDecoder
from torchtune.modules.common_utils import disable_kv_cache

from polopt.batch import RolloutBatch
from polopt.ops.token_logprobs import logprobs_from_logits, token_logprobs
from polopt.packing import default_row_tokens, pack_groups

__all__ = ["response_logprobs", "output_projection_weight"]


def output_projection_weight(model: TransformerDecoder) -> torch.Tensor:
    """The [V, D] weight `model.output` multiplies by: its own, or the tied embedding's.

    Read it inside the owning module's forward: under FSDP2 it is only gathered there."""
    output = model.output
    if isinstance(output, TiedLinear):
        return output.tied_module.weight
    if isinstance(output, nn.Linear):
        if output.bias is not None:
            raise NotImplementedError("response_logprobs(fused=True): model.output has a bias; use fused=False")
        return output.weight
    raise TypeError(
        f"response_logprobs(fused=True): model.output must be nn.Linear or TiedLinear, got {type(output).__name__}; use fused=False"
    )


def _weight_owner(model: TransformerDecoder) -> nn.Module:
    output = model.output
    return output.tied_module if isinstance(output, TiedLinear) else output


def _is_separately_sharded(module: nn.Module, root: nn.Module) -> bool:
    """True when FSDP2 wraps `module` on its own, so its weight is gathered only in its forward."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return module is not root and isinstance(module, FSDPModule)


@contextlib.contextmanager
def _patched(module: nn.Module, name: str, fn):
    """Shadow a bound method by an instance attribute for the duration of one call."""
    if name in vars(module):
        raise RuntimeError(f"{type(module).__name__}.{name} is already patched (nested response_logprobs?)")
    setattr(module, name, fn)
    try:
        yield
    finally:
        delattr(module, name)


def _check_batch(model: nn.Module, batch: RolloutBatch) -> None:
    B, S = batch.input_ids.shape
    P, T = batch.prompt_len, batch.response_len
    if P < 1:
        raise ValueError(f"response_logprobs: batch.prompt_len must be >= 1 (the first response token is predicted from the last prompt token), got {P}")
    if S != P + T:
        raise ValueError(
            f"response_logprobs: batch.input_ids is [{B}, {S}] but prompt_len + response_len = {P} + {T} = {P + T}"
        )
    if batch.attention_mask.shape != batch.input_ids.shape:
        raise ValueError(
            f"response_logprobs: batch.attention_mask {tuple(batch.attention_mask.shape)} != input_ids {tuple(batch.input_ids.shape)}"
        )
    if batch.response_mask.shape != (B, T):
        raise ValueError(f"response_logprobs: batch.response_mask {tuple(batch.response_mask.shape)} != ({B}, {T})")


def response_logprobs(
    model: TransformerDecoder,
    batch: RolloutBatch,
    *,
    temperature: float = 1.0,
    fused: bool = True,
    chunk_size: int = 1024,
    return_entropy: bool = False,
    pack: bool = False,
    max_row_tokens: Optional[int] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(log-probs [B, T] fp32 with grad, entropy [B, T] without grad or None) of the responses.

    Values at padded response positions (response_mask False) are finite but meaningless: they are
    returned raw, not zeroed, and the loss masks them with `batch.response_mask`.

    Args:
        model: a torchtune TransformerDecoder (e.g. qwen2), plain or FSDP2-sharded.
        batch: prompt left-padded ‖ response right-padded, on the model's device.
        temperature: τ the rollout sampled at; log-probs are of softmax(z / τ).
        fused: project only response positions, chunked (polopt.ops.token_logprobs); False
            materialises [B, S, V] logits.
        chunk_size: rows per chunk of the fused projection (peak extra memory ≈ chunk_size·V·4 B).
        return_entropy: also return the per-token entropy of softmax(z / τ), for metrics.
        pack: run the model on polopt.packing's layout (each group's prompt once, no padding)
            instead of the padded batch; the same values to float rounding.
        max_row_tokens: longest packed row (default: polopt.packing.default_row_tokens, at most
            the model's max_seq_len).
    """
    _check_batch(model, batch)
    P, T = batch.prompt_len, batch.response_len
    targets = batch.input_ids[:, P:]
    if pack:
        packed = pack_groups(batch, max_row_tokens or min(model.max_seq_len, default_row_tokens(batch)))
        tokens, mask, input_pos = packed.input_ids, packed.mask, packed.input_pos

        def predicting(h: torch.Tensor) -> torch.Tensor:  # [R, L, ...] -> [B, T, ...]
            return h[packed.rows, packed.positions]
    else:
        attention_mask = batch.attention_mask.bool()
        tokens = batch.input_ids
        mask = get_causal_mask_from_padding_mask(attention_mask)
        input_pos = get_position_ids_from_padding_mask(attention_mask)

        def predicting(h: torch.Tensor) -> torch.Tensor:  # [B, S, ...] -> [B, T, ...]
            return h[:, P - 1 : P - 1 + T]

    cache_off = disable_kv_cache(model) if model.caches_are_enabled() else contextlib.nullcontext()
    with cache_off:
        if not fused:
            logits = model(tokens, mask=mask, input_pos=input_pos)
            if isinstance(logits, list):  # set_num_output_chunks > 0 returns chunks along S
                logits = torch.cat(logits, dim=1)
            logits = predicting(logits)
            if temperature != 1.0:
                logits = logits / temperature
            if return_entropy:
                return logprobs_from_logits(logits, targets, return_entropy=True)
            return logprobs_from_logits(logits, targets), None

        owner = _weight_owner(model)

        def project(hidden: torch.Tensor, weight: torch.Tensor):
            return token_logprobs(
                hidden, weight, targets, temperature=temperature, chunk_size=chunk_size, return_entropy=True
            )

        def fused_unembed(h: torch.Tensor):
            # Only the T positions that predict response tokens go through the norm and projection.
            hidden = model.norm(predicting(h))
            if not _is_separately_sharded(owner, model):
                return project(hidden, output_projection_weight(model))
            # The owner is its own FSDP unit: call it, so its weight is gathered and its gradient
            # reduce-scattered by FSDP's hooks, with the projection in place of its forward.
            with _patched(owner, "forward", lambda x: project(x, owner.weight)):
                return owner(hidden)

        with _patched(model, "unembed", fused_unembed):
            logprobs, entropy = model(tokens, mask=mask, input_pos=input_pos)
    return logprobs, (entropy if return_entropy else None)
