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

from typing import Callable, Optional

import torch
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
        model.setup_caches(batch_size=tokens.shape[0], dtype=model.tok_embeddings.weight.dtype, decoder_max_seq_len=cache_len)
        try:
            logits = model(
                tokens,
                input_pos=get_position_ids_from_padding_mask(prompt_mask),
                mask=get_causal_mask_from_padding_mask(prompt_mask, target_seq_len=cache_len),
            )[:, -1]
            if self.shared_prefill:
                _repeat_caches(model, K)
                logits = logits.repeat_interleave(K, 0)
            # Keys each row may attend to: its real prompt tokens, then every generated token.
            key_mask = torch.zeros((B, cache_len), dtype=torch.bool, device=device)
            key_mask[:, :P] = prompt_mask if not self.shared_prefill else prompt_mask.repeat_interleave(K, 0)
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
                    token[:, None], input_pos=(row_lens + t)[:, None], mask=key_mask[:, None, :]
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
