"""Native rollout: torchtune KV-cache generation on the trainer's own `TransformerDecoder`.

One `generate` call, per chunk of prompts (N prompts × K samples = B rows):

    prefill   the N left-padded prompts once (shared prefill), caches of batch N
    expand    repeat each prompt's KV cache K times (rows i·K … i·K+K−1 belong to prompt i)
    decode    one token per step for all B rows until every row has hit a stop token or
              max_new_tokens; finished rows keep decoding (their tokens are discarded) so that the
              random numbers each row consumes do not depend on when other rows finish

Sampling uses the exponential-race form of a categorical draw, token = argmax(p / q) with
q ~ Exp(1) of shape [B, V] per step from one `torch.Generator`, so the draws are the same with and
without shared prefill. p is softmax(logits / T) truncated by top-k then top-p; the reported
log-prob is log_softmax(logits / T) of the *full* vocabulary (see `polopt.rollout`), which is what
the trainer recomputes.
"""

from __future__ import annotations

import contextlib
from functools import partial
from typing import Callable, Optional

import torch
from torchtune.modules import MultiHeadAttention
from torchtune.generation import get_causal_mask_from_padding_mask, get_position_ids_from_padding_mask
from torchtune.modules.common_utils import delete_kv_caches
from torchtune.modules.kv_cache import KVCache

from polopt.batch import Completion
from polopt.rollout import SamplingParams, check_generate_args


class NativeRolloutEngine:
    """Batched K-sample generation with torchtune KV caches on `model` (fp32 on CPU, any dtype on GPU).

    `engine.model is model`: the recipe relies on that to skip weight syncing. The model's
    train/eval mode is restored and its KV caches deleted after every `generate`, so training
    forwards are unaffected. `max_batch_size` caps the rows (prompts × samples) decoded at once;
    a chunk always holds whole prompts, at least one.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        pad_id: int,
        decode: Callable[[list[int]], str],
        max_batch_size: Optional[int] = None,
        shared_prefill: bool = True,
    ) -> None:
        if max_batch_size is not None and max_batch_size < 1:
            raise ValueError(f"NativeRolloutEngine.max_batch_size must be None or >= 1, got {max_batch_size}")
        self.model = model
        self.pad_id = int(pad_id)
        self.decode = decode
        self.max_batch_size = max_batch_size
        self.shared_prefill = shared_prefill

    def sync_weights(self, state_dict: dict) -> None:
        """Load the trainer's weights (a no-op when the engine generates with the trainer's model)."""
        if state_dict is not None and not _same_tensors(self.model, state_dict):
            self.model.load_state_dict(state_dict)

    @torch.no_grad()
    def generate(
        self, prompt_ids: list[list[int]], num_samples: int, params: SamplingParams
    ) -> list[list[Completion]]:
        check_generate_args(prompt_ids, num_samples, params)
        vocab_size = self.model.tok_embeddings.num_embeddings
        for i, ids in enumerate(prompt_ids):
            bad = [t for t in ids if not 0 <= t < vocab_size]
            if bad:
                raise ValueError(f"prompt_ids[{i}] has token ids outside [0, {vocab_size}): {bad[:5]}")
        longest = max((len(p) for p in prompt_ids), default=0)
        if longest + params.max_new_tokens > self.model.max_seq_len:
            raise ValueError(
                f"longest prompt ({longest} tokens) + max_new_tokens ({params.max_new_tokens}) exceeds the "
                f"model's max_seq_len ({self.model.max_seq_len})"
            )
        if self.model.caches_are_setup():
            raise RuntimeError("NativeRolloutEngine needs a model without KV caches set up (it manages its own)")
        device = self.model.tok_embeddings.weight.device
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=device)
            generator.manual_seed(params.seed)
        per_chunk = len(prompt_ids) if self.max_batch_size is None else max(1, self.max_batch_size // num_samples)
        was_training = self.model.training
        self.model.eval()
        try:
            out: list[list[Completion]] = []
            for start in range(0, len(prompt_ids), per_chunk):
                out.extend(self._generate_chunk(prompt_ids[start : start + per_chunk], num_samples, params, generator))
            return out
        finally:
            self.model.train(was_training)

    def _generate_chunk(
        self,
        prompt_ids: list[list[int]],
        num_samples: int,
        params: SamplingParams,
        generator: Optional[torch.Generator],
    ) -> list[list[Completion]]:
        model, K = self.model, num_samples
        device = model.tok_embeddings.weight.device
        N, P, T = len(prompt_ids), max(len(p) for p in prompt_ids), params.max_new_tokens
        B, cache_len = N * K, P + T
        tokens = torch.full((N, P), self.pad_id, dtype=torch.long, device=device)
        prompt_mask = torch.zeros((N, P), dtype=torch.bool, device=device)
        for i, ids in enumerate(prompt_ids):
            tokens[i, P - len(ids) :] = torch.tensor(ids, dtype=torch.long, device=device)
            prompt_mask[i, P - len(ids) :] = True
        prompt_lens = prompt_mask.sum(1)
        if not self.shared_prefill:
            tokens, prompt_mask = tokens.repeat_interleave(K, 0), prompt_mask.repeat_interleave(K, 0)
        # Caches are sized with the model's own kv-head count, before _grouped_query_decode.
        model.setup_caches(batch_size=tokens.shape[0], dtype=model.tok_embeddings.weight.dtype, decoder_max_seq_len=cache_len)
        try:
            _attend_to_filled_prefix(model)
            with _grouped_query_decode(model):
                logits = model(
                    tokens,
                    input_pos=get_position_ids_from_padding_mask(prompt_mask),
                    mask=get_causal_mask_from_padding_mask(prompt_mask),
                )[:, -1]
                if self.shared_prefill:
                    _repeat_caches(model, K)
                    logits = logits.repeat_interleave(K, 0)
                    prompt_mask = prompt_mask.repeat_interleave(K, 0)
                # Keys each row may attend to: its real prompt tokens, then every generated token.
                key_mask = torch.zeros((B, cache_len), dtype=torch.bool, device=device)
                key_mask[:, :P] = prompt_mask
                row_lens = prompt_lens.repeat_interleave(K)
                stop_ids = torch.tensor(params.stop_token_ids, dtype=torch.long, device=device)
                out_tokens = torch.zeros((B, T), dtype=torch.long, device=device)
                out_logprobs = torch.zeros((B, T), dtype=torch.float32, device=device)
                lengths = torch.full((B,), T, dtype=torch.long, device=device)
                stopped = torch.zeros(B, dtype=torch.bool, device=device)
                for t in range(T):
                    token, logprob = sample_tokens(logits, params, generator)
                    out_tokens[:, t], out_logprobs[:, t] = token, logprob
                    newly = torch.isin(token, stop_ids) & ~stopped
                    lengths[newly] = t + 1
                    stopped |= newly
                    if t == T - 1 or bool(stopped.all()):
                        break
                    key_mask[:, P + t] = True
                    logits = model(
                        token[:, None], input_pos=(row_lens + t)[:, None], mask=key_mask[:, None, : P + t + 1]
                    )[:, -1]
        finally:
            delete_kv_caches(model)
        return self._completions(out_tokens, out_logprobs, lengths, stopped, N, K)

    def _completions(self, tokens, logprobs, lengths, stopped, N: int, K: int) -> list[list[Completion]]:
        tokens, logprobs, lengths, stopped = tokens.tolist(), logprobs.tolist(), lengths.tolist(), stopped.tolist()
        out = []
        for i in range(N):
            group = []
            for row in range(i * K, (i + 1) * K):
                n = lengths[row]
                ids = tokens[row][:n]
                text_ids = ids[:-1] if stopped[row] else ids
                group.append(Completion(ids, logprobs[row][:n], truncated=not stopped[row], text=self.decode(text_ids)))
            out.append(group)
        return out


def sample_tokens(
    logits: torch.Tensor, params: SamplingParams, generator: Optional[torch.Generator]
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row from logits [B, V]: (token [B], log_softmax(logits/T)[token] [B], fp32).

    top-k keeps the k largest logits (ties at the k-th value kept), top-p the smallest prefix of
    the sorted distribution whose mass reaches p (at least one token). The draw is
    argmax(p / q), q ~ Exp(1) — an exact categorical sample that consumes B·V numbers per step
    whatever the truncation.
    """
    scaled = logits.float() / params.temperature
    logprobs = torch.log_softmax(scaled, dim=-1)
    probs = logprobs.exp()
    if params.top_k is not None and params.top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, params.top_k, dim=-1).values[:, -1:]
        probs = probs.masked_fill(scaled < kth, 0.0)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        mass_before = sorted_probs.cumsum(-1) - sorted_probs
        drop_sorted = mass_before >= params.top_p * sorted_probs.sum(-1, keepdim=True)
        drop_sorted[:, 0] = False
        probs = probs.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), 0.0)
    q = torch.empty_like(probs).exponential_(1, generator=generator)
    token = (probs / q).argmax(-1)
    return token, logprobs.gather(-1, token[:, None]).squeeze(-1)


class _FilledPrefixKVCache(KVCache):
    """A torchtune KVCache whose `update` returns only the filled positions, so attention (and
    torchtune's grouped-query expand, a copy) cost the current length, not the full P + T.
    The fill level is a Python int: no device sync per layer."""

    filled: int = 0

    def update(self, k_val: torch.Tensor, v_val: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k_out, v_out = super().update(k_val, v_val)
        self.filled += k_val.shape[2]
        return k_out[:, :, : self.filled], v_out[:, :, : self.filled]


def _attend_to_filled_prefix(model: torch.nn.Module) -> None:
    for module in model.modules():
        if type(module) is KVCache:
            module.__class__ = _FilledPrefixKVCache
            module.filled = 0


@contextlib.contextmanager
def _grouped_query_decode(model: torch.nn.Module):
    """During generation only: attend with the n_kv cached heads directly instead of torchtune's
    copy of the whole cache to n_h heads at every step (its grouped-query `expand`), which is
    most of a decode step's memory traffic. Each attention module is told it has n_h kv heads
    (so it skips the expand) and gets an attention call that groups the queries by kv head.
    Restored on exit; training forwards never see it."""
    patched = []
    for module in model.modules():
        if isinstance(module, MultiHeadAttention) and module.num_heads != module.num_kv_heads:
            patched.append((module, module.num_kv_heads, module.__dict__.get("_attention_call")))
            module._attention_call = partial(_grouped_attention, groups=module.num_heads // module.num_kv_heads)
            module.num_kv_heads = module.num_heads
    try:
        yield
    finally:
        for module, num_kv_heads, attention_call in patched:
            module.num_kv_heads = num_kv_heads
            if attention_call is None:
                del module._attention_call
            else:
                module._attention_call = attention_call


def _grouped_attention(q, k, v, mask, dropout_p: float, is_causal: bool, *, groups: int) -> torch.Tensor:
    """q [b, n_h, s, d] against k, v [b, n_kv, L, d] with n_h = groups · n_kv (head h reads kv
    head h // groups, as torchtune's expand does); mask [b, s, L] boolean."""
    b, n_h, s, d = q.shape
    attn_mask = None if mask is None else mask[:, None]
    if s == 1:  # decode: the `groups` query heads of a kv head form one [groups, d] block
        out = torch.nn.functional.scaled_dot_product_attention(
            q.view(b, n_h // groups, groups, d), k, v, attn_mask=attn_mask, dropout_p=dropout_p
        )
        return out.view(b, n_h, 1, d)
    return torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, enable_gqa=True
    )


def _repeat_caches(model: torch.nn.Module, times: int) -> None:
    """Replicate each cache row `times` times in place (row i → rows i·times … i·times+times−1)."""
    for module in model.modules():
        if isinstance(module, KVCache):
            module.k_cache = module.k_cache.repeat_interleave(times, 0)
            module.v_cache = module.v_cache.repeat_interleave(times, 0)
            module.batch_size = module.k_cache.shape[0]


def _same_tensors(model: torch.nn.Module, state_dict: dict) -> bool:
    """True if every tensor of `state_dict` *is* the model's own parameter/buffer (nothing to load)."""
    own = model.state_dict(keep_vars=True)
    return all(k in own and own[k] is v for k, v in state_dict.items())
