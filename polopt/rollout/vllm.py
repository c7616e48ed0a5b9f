"""vLLM rollout: a colocated `vllm.LLM` that samples, with the trainer's weights pushed in after
every update. GPU only; `pip install polopt[vllm]`. vLLM is imported inside `__init__`, so importing
this module never needs it.

Written against vLLM's documented offline API (checked for vLLM 0.8–0.20 docs):
- `LLM.generate(prompts, sampling_params)` with prompts given as token ids,
  `{"prompt_token_ids": [...]}` (`vllm.inputs.TokensPrompt`), one `RequestOutput` per prompt whose
  `.outputs` holds the n `CompletionOutput`s (`token_ids`, `logprobs`, `finish_reason`).
- `SamplingParams(logprobs=0)` returns the sampled token's log-prob at every step, as a list of
  dicts {token_id: Logprob(logprob=...)}.
- Weight push: TRL's colocate mode (trl/generation/vllm_generation.py, `sync_weights`, TRL 1.16)
  calls `llm.llm_engine.model_executor.driver_worker.model_runner.model.load_weights([(name, t)])`
  then `llm.reset_prefix_cache()`; that object exists when the engine runs in this process
  (V1 with VLLM_ENABLE_V1_MULTIPROCESSING=0, set here for tensor_parallel_size=1). Otherwise
  (tensor parallel, worker processes) the documented `LLM.apply_model(func)` runs
  `model.load_weights` inside every worker (vllm-project/vllm#16434 explains why the
  driver_worker route does not exist with V1 multiprocessing).

Log-probs: vLLM reports them according to its `logprobs_mode`. The default `raw_logprobs` is
log_softmax of the raw logits (temperature 1); `processed_logprobs` is after temperature *and*
top-k/top-p. polopt's convention (after temperature, before truncation — see `polopt.rollout`) is
matched by `raw_logprobs` only at temperature 1 and by `processed_logprobs` only without top-k/top-p,
which is why the vLLM configs set `recompute_old_logprobs: true`. Pass `logprobs_mode=` through
`llm_kwargs` to choose.
"""

from __future__ import annotations

import logging
import math
import os
from functools import partial
from typing import Callable, Optional

from polopt.batch import Completion
from polopt.rollout import SamplingParams, check_generate_args

log = logging.getLogger(__name__)


class VLLMRolloutEngine:
    """K samples per prompt from a colocated `vllm.LLM`; `sync_weights` pushes torchtune weights.

    `decode` turns token ids into text; by default the engine's own tokenizer
    (`llm.get_tokenizer().decode(ids, skip_special_tokens=True)`).
    """

    def __init__(
        self,
        model_name_or_path: str,
        decode: Optional[Callable[[list[int]], str]] = None,
        gpu_memory_utilization: float = 0.5,
        dtype: str = "bfloat16",
        tensor_parallel_size: int = 1,
        enable_prefix_caching: bool = True,
        seed: int = 0,
        **llm_kwargs,
    ) -> None:
        try:
            import vllm
        except ImportError as e:
            raise ImportError(
                "VLLMRolloutEngine needs vLLM, which is not installed: `pip install polopt[vllm]` "
                "(CUDA only), or use polopt.rollout.NativeRolloutEngine"
            ) from e
        from vllm.inputs import TokensPrompt

        self._vllm = vllm
        self._tokens_prompt = TokensPrompt
        if tensor_parallel_size == 1:
            # Keep the engine in this process so the trainer's tensors reach the model without a copy.
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        self.model_name_or_path = model_name_or_path
        self.tensor_parallel_size = tensor_parallel_size
        self.llm = vllm.LLM(
            model=model_name_or_path,
            gpu_memory_utilization=gpu_memory_utilization,
            dtype=dtype,
            tensor_parallel_size=tensor_parallel_size,
            enable_prefix_caching=enable_prefix_caching,
            seed=seed,
            **llm_kwargs,
        )
        if decode is None:
            tokenizer = self.llm.get_tokenizer()
            decode = partial(tokenizer.decode, skip_special_tokens=True)
        self.decode = decode
        self._warned_logprobs = False

    def sampling_params(self, num_samples: int, params: SamplingParams):
        """polopt → vLLM sampling parameters, one to one (top_k None ↔ vLLM's -1 "all tokens")."""
        return self._vllm.SamplingParams(
            n=num_samples,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=-1 if params.top_k is None else params.top_k,
            max_tokens=params.max_new_tokens,
            stop_token_ids=list(params.stop_token_ids),
            seed=params.seed,
            logprobs=0,
        )

    def generate(
        self, prompt_ids: list[list[int]], num_samples: int, params: SamplingParams
    ) -> list[list[Completion]]:
        check_generate_args(prompt_ids, num_samples, params)
        if params.temperature != 1.0 and not self._warned_logprobs:
            log.warning(
                "vLLM reports log-probs per its logprobs_mode, not log_softmax(logits / %s): "
                "set recompute_old_logprobs: true (the vLLM configs do)",
                params.temperature,
            )
            self._warned_logprobs = True
        prompts = [self._tokens_prompt(prompt_token_ids=list(ids)) for ids in prompt_ids]
        outputs = self.llm.generate(prompts, self.sampling_params(num_samples, params), use_tqdm=False)
        if len(outputs) != len(prompt_ids):
            raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(prompt_ids)} prompts")
        return [[self._completion(out, params) for out in request.outputs] for request in outputs]

    def _completion(self, out, params: SamplingParams) -> Completion:
        """One vLLM CompletionOutput → Completion; the stop token stays in token_ids (vLLM keeps
        stop_token_ids in the output ids), and the text is decoded without it."""
        token_ids = list(out.token_ids)
        if out.logprobs is None or len(out.logprobs) != len(token_ids):
            raise RuntimeError(
                f"vLLM returned {0 if out.logprobs is None else len(out.logprobs)} log-prob entries for "
                f"{len(token_ids)} tokens; the engine requests logprobs=0 for every sampled token"
            )
        logprobs = [_sampled_logprob(step, token) for step, token in zip(out.logprobs, token_ids)]
        truncated = out.finish_reason == "length"
        stopped = bool(token_ids) and token_ids[-1] in params.stop_token_ids and not truncated
        text_ids = token_ids[:-1] if stopped else token_ids
        return Completion(token_ids, logprobs, truncated=truncated, text=self.decode(text_ids))

    def sync_weights(self, state_dict: dict) -> None:
        """Push torchtune-named weights (full, unsharded) into the engine under HF names."""
        weights = list(to_hf_state_dict(state_dict, self.model_name_or_path).items())
        executor = getattr(self.llm.llm_engine, "model_executor", None)
        driver = getattr(executor, "driver_worker", None)
        if driver is not None and self.tensor_parallel_size == 1:
            driver.model_runner.model.load_weights(weights)
        else:
            self.llm.apply_model(partial(_load_weights, weights=weights))
        # Cached prefixes were computed with the old weights.
        self.llm.reset_prefix_cache()


def _load_weights(model, weights):
    """Runs inside each vLLM worker (picklable: module-level)."""
    return model.load_weights(weights)


def _sampled_logprob(step: dict, token_id: int) -> float:
    """vLLM's per-step dict {token_id: Logprob} → the sampled token's log-prob as a float."""
    if token_id not in step:
        raise RuntimeError(f"vLLM log-probs for a step lack the sampled token {token_id} (got {sorted(step)})")
    value = step[token_id]
    value = float(getattr(value, "logprob", value))
    if math.isnan(value):
        raise RuntimeError(f"vLLM returned a NaN log-prob for token {token_id}")
    return value


def to_hf_state_dict(state_dict: dict, model_name_or_path: str) -> dict:
    """torchtune names → HF names with torchtune's own converters, using the HF config.json of
    `model_name_or_path` for head counts and tied embeddings (qwen2 and llama families)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_name_or_path)
    kwargs = dict(
        num_heads=config.num_attention_heads,
        num_kv_heads=config.num_key_value_heads,
        dim=config.hidden_size,
        head_dim=getattr(config, "head_dim", None),
    )
    if config.model_type == "qwen2":
        from torchtune.models.qwen2._convert_weights import qwen2_tune_to_hf

        return qwen2_tune_to_hf(state_dict, tie_word_embeddings=config.tie_word_embeddings, **kwargs)
    if config.model_type == "llama":
        from torchtune.models.convert_weights import tune_to_hf

        return tune_to_hf(state_dict, **kwargs)
    raise ValueError(
        f"{model_name_or_path}: model_type {config.model_type!r} has no torchtune→HF converter here "
        "(supported: qwen2, llama)"
    )
