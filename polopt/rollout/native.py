"""Native rollout: torchtune KV-cache generation on the trainer's own `TransformerDecoder`.

One `generate` call, per chunk of prompts (N prompts × K samples = B rows):

    prefill   the N left-padded prompts once (shared prefill): a prefix cache of batch N
    decode    one token per step for every row still running, until all rows have hit a stop
              token or max_new_tokens. The K rows of a prompt attend to its one prefix cache (their
              queries stacked into one matrix per prompt) plus their own generated keys, so the
              prompt's keys are read once per step, not K times
    retire    once a quarter of the prompts still decoding have all K rows stopped, their rows
              leave the batch (caches compacted); rows of a prompt that is still running go on
              decoding after their own stop token, their tokens discarded

`shared_prefill=False` is the readable reference: torchtune's own KV caches and attention, nothing
patched, one prefill per answer (N·K rows) and every row decoded until all have stopped — the
same answers (same random draws), more work. The fast path keeps torchtune's `KVCache` objects but,
for the duration of one `generate`, gives them the prefix-sharing behaviour below
(`_prefix_shared_attention`); tests check that both paths return the same answers.

Sampling uses the exponential-race form of a categorical draw, token = argmax(p / q) with
q ~ Exp(1) of shape [B, V] per step from one `torch.Generator`, drawn for all B rows whether or not
they still run, so each row's draws are the same with and without shared prefill and whatever the
other rows do. p is softmax(logits / T) truncated by top-k then top-p; the reported log-prob is
log_softmax(logits / T) of the *full* vocabulary (see `polopt.rollout`), which is what the trainer
recomputes.
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
from polopt.ops import probs_from_logprobs_
from polopt.rollout import SamplingParams, check_generate_args


RETIRE_FRACTION = 0.25  # retire finished prompts once they are this fraction of those still decoding


class NativeRolloutEngine:
    """Batched K-sample generation with torchtune KV caches on `model` (fp32 on CPU, any dtype on GPU).

    `engine.model is model`: the recipe relies on that to skip weight syncing. The model's
    train/eval mode is restored and its KV caches deleted after every `generate`, so training
    forwards are unaffected. `max_batch_size` caps the rows (prompts × samples) decoded at once;
    a chunk always holds whole prompts, at least one.
    """

    shares_trainer_model = True  # generates with the model it is given: no weight copy to sync

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

    def sync_weights(self, weights) -> None:
        """Load the trainer's weights (a no-op when the engine generates with the trainer's model).

        `weights`: a state dict (loaded with `load_state_dict`, strict), or an iterable of
        (name, tensor) pairs consumed once, each copied into its parameter as it arrives (the
        vLLM engine's streaming form). A name the model lacks or a shape that differs is a
        ValueError when it arrives; a weight that never came, one at the end.
        """
        if weights is None:
            return
        if isinstance(weights, dict):
            if not _same_tensors(self.model, weights):
                self.model.load_state_dict(weights)
            return
        own = self.model.state_dict(keep_vars=True)
        arrived = set()
        with torch.no_grad():
            for name, tensor in weights:
                if name not in own:
                    raise ValueError(f"sync_weights: the rollout model has no weight {name!r}")
                if tuple(tensor.shape) != tuple(own[name].shape):
                    raise ValueError(f"sync_weights: {name} has shape {tuple(tensor.shape)}, the rollout model's "
                                     f"{tuple(own[name].shape)}")
                if own[name] is not tensor:
                    own[name].copy_(tensor)
                arrived.add(name)
        missing = sorted(set(own) - arrived)
        if missing:
            raise ValueError(f"sync_weights: weights missing from the stream: {', '.join(missing[:5])}"
                             f"{' …' if len(missing) > 5 else ''}")

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
            generate_chunk = self._generate_chunk if self.shared_prefill else self._generate_chunk_plain
            for start in range(0, len(prompt_ids), per_chunk):
                out.extend(generate_chunk(prompt_ids[start : start + per_chunk], num_samples, params, generator))
            return out
        finally:
            self.model.train(was_training)

    def _left_padded(self, prompt_ids: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
        P = max(len(p) for p in prompt_ids)
        tokens = torch.full((len(prompt_ids), P), self.pad_id, dtype=torch.long, device=device)
        prompt_mask = torch.zeros((len(prompt_ids), P), dtype=torch.bool, device=device)
        for i, ids in enumerate(prompt_ids):
            tokens[i, P - len(ids) :] = torch.tensor(ids, dtype=torch.long, device=device)
            prompt_mask[i, P - len(ids) :] = True
        return tokens, prompt_mask

    def _generate_chunk_plain(
        self,
        prompt_ids: list[list[int]],
        num_samples: int,
        params: SamplingParams,
        generator: Optional[torch.Generator],
    ) -> list[list[Completion]]:
        """torchtune's incremental decoding as its `generate` does it: caches for P + T positions,
        the causal mask of the padding mask, one row per answer."""
        model, K = self.model, num_samples
        device = model.tok_embeddings.weight.device
        tokens, prompt_mask = self._left_padded(prompt_ids, device)
        tokens, prompt_mask = tokens.repeat_interleave(K, 0), prompt_mask.repeat_interleave(K, 0)
        (B, P), T = tokens.shape, params.max_new_tokens
        padding_mask = torch.cat([prompt_mask, torch.ones((B, T), dtype=torch.bool, device=device)], dim=1)
        masks = get_causal_mask_from_padding_mask(padding_mask, target_seq_len=P + T)
        input_pos = get_position_ids_from_padding_mask(padding_mask)
        stop_ids, out_tokens, out_logprobs, lengths, stopped = _decode_buffers(B, T, params, device)
        model.setup_caches(batch_size=B, dtype=model.tok_embeddings.weight.dtype, decoder_max_seq_len=P + T)
        try:
            logits = model(tokens, input_pos=input_pos[:, :P], mask=masks[:, :P])[:, -1]
            for t in range(T):
                noise = _exponential_noise((B, logits.shape[-1]), device, generator)
                token, logprob = sample_tokens(logits, params, noise=noise)
                out_tokens[:, t], out_logprobs[:, t] = token, logprob
                newly = torch.isin(token, stop_ids) & ~stopped
                lengths[newly] = t + 1
                stopped |= newly
                if t == T - 1 or bool(stopped.all()):
                    break
                logits = model(token[:, None], input_pos=input_pos[:, P + t, None], mask=masks[:, P + t, None, :])[:, -1]
        finally:
            delete_kv_caches(model)
        return self._completions(out_tokens, out_logprobs, lengths, stopped, len(prompt_ids), K)

    def _generate_chunk(
        self,
        prompt_ids: list[list[int]],
        num_samples: int,
        params: SamplingParams,
        generator: Optional[torch.Generator],
    ) -> list[list[Completion]]:
        model, K = self.model, num_samples
        device = model.tok_embeddings.weight.device
        tokens, prompt_mask = self._left_padded(prompt_ids, device)
        (N, P), T = tokens.shape, params.max_new_tokens
        B = N * K
        row_lens = prompt_mask.sum(1).repeat_interleave(K)
        share = K  # a "prefix" is one prefilled prompt and the K rows that decode from it
        model.setup_caches(batch_size=tokens.shape[0], dtype=model.tok_embeddings.weight.dtype, decoder_max_seq_len=P)
        try:
            with _prefix_shared_attention(model) as caches:
                logits = model(
                    tokens,
                    input_pos=get_position_ids_from_padding_mask(prompt_mask),
                    mask=get_causal_mask_from_padding_mask(prompt_mask),
                )[:, -1].repeat_interleave(share, 0)
                for cache in caches:
                    cache.start_decoding(rows_per_prefix=share, max_new_tokens=T)
                # Keys each row may attend to: its real prompt tokens, then every generated token.
                key_mask = torch.ones((B, P + T), dtype=torch.bool, device=device)
                key_mask[:, :P] = prompt_mask.repeat_interleave(share, 0)
                stop_ids, out_tokens, out_logprobs, lengths, stopped = _decode_buffers(B, T, params, device)
                rows = torch.arange(B, device=device)  # the rows still decoding, prefix by prefix
                for t in range(T):
                    # Noise for all B rows every step: a row's draws never depend on the others.
                    noise = _exponential_noise((B, logits.shape[-1]), device, generator)
                    token, logprob = sample_tokens(logits, params, noise=noise[rows])
                    out_tokens[rows, t], out_logprobs[rows, t] = token, logprob
                    was_stopped = stopped[rows]
                    newly = torch.isin(token, stop_ids) & ~was_stopped
                    lengths[rows[newly]] = t + 1
                    stopped[rows[newly]] = True
                    if t == T - 1:
                        break
                    done = (was_stopped | newly).view(-1, share).all(1)
                    if bool(done.all()):
                        break
                    # Compacting the caches costs about one step's cache reads: worth it once a
                    # quarter of the prefixes left are done.
                    n_done = int(done.sum())
                    if n_done and n_done >= RETIRE_FRACTION * done.numel():
                        keep = (~done).nonzero().squeeze(1)
                        keep_rows = (keep[:, None] * share + torch.arange(share, device=device)).flatten()
                        for cache in caches:
                            cache.keep_prefixes(keep, keep_rows)
                        rows, token = rows[keep_rows], token[keep_rows]
                    logits = model(
                        token[:, None], input_pos=(row_lens[rows] + t)[:, None], mask=key_mask[rows, None, : P + t + 1]
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


def _decode_buffers(B: int, T: int, params: SamplingParams, device):
    """stop ids, and per row: tokens [B, T], log-probs [B, T], length (T until a stop), stopped."""
    return (
        torch.tensor(params.stop_token_ids, dtype=torch.long, device=device),
        torch.zeros((B, T), dtype=torch.long, device=device),
        torch.zeros((B, T), dtype=torch.float32, device=device),
        torch.full((B,), T, dtype=torch.long, device=device),
        torch.zeros(B, dtype=torch.bool, device=device),
    )


def sample_tokens(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: Optional[torch.Generator] = None,
    *,
    noise: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row from logits [B, V]: (token [B], log_softmax(logits/T)[token] [B], fp32).

    top-k keeps the k largest logits (ties at the k-th value kept), top-p the smallest prefix of
    the sorted distribution whose mass reaches p (at least one token). The draw is
    argmax(p / q), q ~ Exp(1) — an exact categorical sample that consumes B·V numbers per step
    whatever the truncation. `noise` is that q, [B, V] (drawn from `generator` when not given).
    """
    scaled = logits.float() / params.temperature
    logprobs = torch.log_softmax(scaled, dim=-1)
    probs = probs_from_logprobs_(logprobs.clone())  # p < e^-60 is 0: never drawn either way
    if params.top_k is not None and params.top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, params.top_k, dim=-1).values[:, -1:]
        probs = probs.masked_fill(scaled < kth, 0.0)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        mass_before = sorted_probs.cumsum(-1) - sorted_probs
        drop_sorted = mass_before >= params.top_p * sorted_probs.sum(-1, keepdim=True)
        drop_sorted[:, 0] = False
        probs = probs.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), 0.0)
    if noise is None:
        noise = _exponential_noise(probs.shape, probs.device, generator)
    token = (probs / noise).argmax(-1)
    return token, logprobs.gather(-1, token[:, None]).squeeze(-1)


def _exponential_noise(shape, device, generator: Optional[torch.Generator]) -> torch.Tensor:
    """q ~ Exp(1) as −log U, U ~ U[0, 1) (a quarter of `Tensor.exponential_`'s time on CPU).
    U = 0 gives q = inf, so that token's p / q is 0: never NaN, never picked."""
    return torch.rand(shape, device=device, generator=generator).log_().neg_()


class _PrefixSharedKVCache(KVCache):
    """A torchtune KVCache for generation from shared prefixes.

    Prefill: the R prompts are written as usual (the cache holds exactly P positions) and
    `update` returns them. `start_decoding(rows_per_prefix=K, ...)` then keeps those P positions
    as the *prefix* cache [R, n_kv, P, d] and starts a *generated* cache [R·K, n_kv, T, d]; each
    decode `update` appends to the generated cache and returns its filled part, and
    `_prefix_shared_attention_call` reads the prefix cache once per prompt for its K rows
    (instead of K copies of it). Fill levels are Python ints: no device sync per layer.
    """

    prefix_k: Optional[torch.Tensor] = None
    prefix_v: Optional[torch.Tensor] = None
    filled: int = 0

    def start_decoding(self, rows_per_prefix: int, max_new_tokens: int) -> None:
        self.prefix_k, self.prefix_v = self.k_cache, self.v_cache
        R, n_kv, _, d = self.k_cache.shape
        shape = (R * rows_per_prefix, n_kv, max_new_tokens, d)
        self.k_cache = torch.zeros(shape, dtype=self.k_cache.dtype, device=self.k_cache.device)
        self.v_cache = torch.zeros_like(self.k_cache)
        self.filled = 0

    def keep_prefixes(self, keep: torch.Tensor, rows: torch.Tensor) -> None:
        """Keep only the prefixes `keep` (indices, ascending) and their generated-cache `rows`."""
        self.prefix_k, self.prefix_v = self.prefix_k[keep], self.prefix_v[keep]
        self.k_cache, self.v_cache = self.k_cache[rows], self.v_cache[rows]

    def update(self, k_val: torch.Tensor, v_val: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.prefix_k is None:
            return super().update(k_val, v_val)
        end = self.filled + k_val.shape[2]
        self.k_cache[:, :, self.filled : end] = k_val
        self.v_cache[:, :, self.filled : end] = v_val
        self.filled = end
        return self.k_cache[:, :, :end], self.v_cache[:, :, :end]


@contextlib.contextmanager
def _prefix_shared_attention(model: torch.nn.Module):
    """During generation only: turn the model's KV caches into `_PrefixSharedKVCache`s and give
    each attention module `_prefix_shared_attention_call`. Grouped-query modules are told they
    have n_h kv heads, so torchtune skips its per-step copy of the cache to n_h heads (most of a
    decode step's memory traffic) and the call groups the queries by kv head instead. Yields the
    caches; everything is restored on exit, so training forwards never see it."""
    patched, caches = [], []
    for module in model.modules():
        if isinstance(module, MultiHeadAttention) and module.kv_cache is not None:
            cache = module.kv_cache
            cache.__class__ = _PrefixSharedKVCache
            caches.append(cache)
            patched.append((module, module.num_kv_heads, module.__dict__.get("_attention_call")))
            module._attention_call = partial(
                _prefix_shared_attention_call, cache=cache, groups=module.num_heads // module.num_kv_heads
            )
            module.num_kv_heads = module.num_heads
    try:
        yield caches
    finally:
        for module, num_kv_heads, attention_call in patched:
            module.num_kv_heads = num_kv_heads
            if attention_call is None:
                del module._attention_call
            else:
                module._attention_call = attention_call


def _prefix_shared_attention_call(
    q, k, v, mask, dropout_p: float, is_causal: bool, *, cache: _PrefixSharedKVCache, groups: int
) -> torch.Tensor:
    """Attention of q [b, n_h, s, d] (n_h = groups · n_kv; head h reads kv head h // groups, as
    torchtune's expand does) with a boolean mask [b, s, keys].

    Prefill (no prefix cache yet): k, v [b, n_kv, s, d] are the prompts' own keys; plain SDPA.
    Decode (s = 1, b = R·K rows, K per prefix): the keys are the prefix [R, n_kv, P, d] followed by
    the row's generated keys k, v [b, n_kv, t, d], so

        scores = [q·K_prefixᵀ | q·K_genᵀ] / √d,   out = softmax(scores) · [V_prefix ; V_gen]

    with the K·groups queries of a prefix stacked into one matrix against its prefix keys, so each
    prefix's keys and values are read once per step rather than K times."""
    if cache.prefix_k is None:
        return torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=None if mask is None else mask[:, None], dropout_p=dropout_p,
            is_causal=is_causal, enable_gqa=groups > 1,
        )
    prefix_k, prefix_v = cache.prefix_k, cache.prefix_v
    R, n_kv, P, d = prefix_k.shape
    b, t = q.shape[0], k.shape[2]
    share = b // R
    # [b, n_h, 1, d] → per prefix: [R, n_kv, share·groups, d]
    q_prefix = q.view(R, share, n_kv, groups, d).transpose(1, 2).reshape(R, n_kv, share * groups, d)
    s_prefix = torch.matmul(q_prefix, prefix_k.transpose(-1, -2))
    s_prefix = s_prefix.view(R, n_kv, share, groups, P).transpose(1, 2).reshape(b, n_kv, groups, P)
    s_gen = torch.matmul(q.view(b, n_kv, groups, d), k.transpose(-1, -2))
    scores = torch.cat([s_prefix, s_gen], dim=-1).float() * d**-0.5
    scores = scores.masked_fill(~mask[:, None], float("-inf"))  # mask [b, 1, P + t] → [b, 1, 1, P + t]
    probs = scores.softmax(-1).to(q.dtype)
    p_prefix = probs[..., :P].reshape(R, share, n_kv, groups, P).transpose(1, 2).reshape(R, n_kv, share * groups, P)
    out_prefix = torch.matmul(p_prefix, prefix_v).view(R, n_kv, share, groups, d).transpose(1, 2)
    out = out_prefix.reshape(b, n_kv, groups, d) + torch.matmul(probs[..., P:], v)
    return out.reshape(b, n_kv * groups, 1, d)


def _same_tensors(model: torch.nn.Module, state_dict: dict) -> bool:
    """True if every tensor of `state_dict` *is* the model's own parameter/buffer (nothing to load)."""
    own = model.state_dict(keep_vars=True)
    return all(k in own and own[k] is v for k, v in state_dict.items())
