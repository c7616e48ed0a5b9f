"""A faithful fake of exactly the vLLM surface polopt.rollout.vllm calls (vLLM is CUDA-only).

Behaviour copied from vLLM's documented offline API (V1 engine):
- `SamplingParams(n, temperature, top_p, top_k, max_tokens, stop_token_ids, seed, logprobs)` with
  vLLM's validation (top_k −1 = all tokens; logprobs=0 = the sampled token's log-prob only).
- `LLM.generate(prompts, sampling_params, use_tqdm=...)` takes `TokensPrompt`s (TypedDicts with
  `prompt_token_ids`) and returns one `RequestOutput` per prompt with n `CompletionOutput`s. A
  stop token is kept in `token_ids` (finish_reason "stop", stop_reason = the id; the stop check
  runs before the length check); hitting `max_tokens` gives finish_reason "length". Log-probs are
  a list (one per generated token) of {token_id: Logprob}, in vLLM's default `raw_logprobs` mode
  (log_softmax of the raw logits, temperature 1).
- The model behind it is a fixed random bigram table; sampling honours temperature, top-k, top-p
  and the seed. Weights pushed with `load_weights` are checked against the names/shapes of a real
  transformers model built from the checkpoint's config.json, with vLLM's Qwen2 rule that
  `lm_head.weight` is skipped when embeddings are tied; unknown names raise KeyError as vLLM does.
- `llm.llm_engine.model_executor.driver_worker.model_runner.model` exists only when the engine
  runs in-process (tensor_parallel_size 1 and VLLM_ENABLE_V1_MULTIPROCESSING=0); otherwise only
  `LLM.apply_model(func)` reaches the model (once per worker).
"""

from __future__ import annotations

import os
import sys
import types
from dataclasses import dataclass, field
from typing import Any, Optional, TypedDict

import torch


class TokensPrompt(TypedDict, total=False):
    prompt_token_ids: list[int]


@dataclass
class Logprob:
    logprob: float
    rank: Optional[int] = None
    decoded_token: Optional[str] = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: Optional[float]
    logprobs: Optional[list[dict[int, Logprob]]]
    finish_reason: Optional[str] = None
    stop_reason: Any = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: Optional[str]
    prompt_token_ids: list[int]
    prompt_logprobs: Any
    outputs: list[CompletionOutput]
    finished: bool = True


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: Optional[int] = None
    stop_token_ids: list[int] = field(default_factory=list)
    max_tokens: Optional[int] = 16
    logprobs: Optional[int] = None

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"n must be at least 1, got {self.n}.")
        if self.temperature < 0:
            raise ValueError(f"temperature must be non-negative, got {self.temperature}.")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}.")
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1 (disable), or at least 1, got {self.top_k}.")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}.")
        if self.logprobs is not None and self.logprobs < 0:
            raise ValueError(f"logprobs must be non-negative, got {self.logprobs}.")


class _Tokenizer:
    special_ids = {0}

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return "".join(f"<{i}>" for i in ids if not (skip_special_tokens and i in self.special_ids))


class _WorkerModel:
    """Stands for vLLM's Qwen2ForCausalLM inside a worker: only `load_weights`."""

    def __init__(self, config) -> None:
        import transformers

        reference = transformers.Qwen2ForCausalLM(config)
        self.expected_shapes = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
        self.tie_word_embeddings = config.tie_word_embeddings
        self.loaded: dict[str, torch.Tensor] = {}
        self.load_route: Optional[str] = None

    def load_weights(self, weights):
        loaded = set()
        for name, tensor in weights:
            if self.tie_word_embeddings and name == "lm_head.weight":
                continue
            if name not in self.expected_shapes:
                raise KeyError(name)
            if tuple(tensor.shape) != self.expected_shapes[name]:
                raise AssertionError(f"{name}: shape {tuple(tensor.shape)} != {self.expected_shapes[name]}")
            self.loaded[name] = tensor.detach().clone()
            loaded.add(name)
        return loaded


class LLM:
    def __init__(self, model: str, **kwargs) -> None:
        import transformers

        self.init_kwargs = dict(model=model, **kwargs)
        self.config = transformers.AutoConfig.from_pretrained(model)
        self.worker_model = _WorkerModel(self.config)
        self.tensor_parallel_size = kwargs.get("tensor_parallel_size", 1)
        self.llm_engine = types.SimpleNamespace()
        if self.tensor_parallel_size == 1 and os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0":
            outer = self

            class _Model:  # records the route, then delegates
                def load_weights(self, weights):
                    outer.worker_model.load_route = "driver_worker"
                    return outer.worker_model.load_weights(weights)

            runner = types.SimpleNamespace(model=_Model())
            self.llm_engine.model_executor = types.SimpleNamespace(driver_worker=types.SimpleNamespace(model_runner=runner))
        vocab = self.config.vocab_size
        self._bigram_logits = torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(0)) * 2
        self.prefix_cache_resets = 0
        self.drop_logprobs = False
        self.last_sampling_params = self.last_prompts = self.last_outputs = None

    def get_tokenizer(self):
        return _Tokenizer()

    def apply_model(self, func):
        self.worker_model.load_route = "apply_model"
        return [func(self.worker_model) for _ in range(self.tensor_parallel_size)]

    def reset_prefix_cache(self) -> bool:
        self.prefix_cache_resets += 1
        return True

    def generate(self, prompts, sampling_params: SamplingParams, use_tqdm: bool = True) -> list[RequestOutput]:
        if not isinstance(sampling_params, SamplingParams):
            raise TypeError("sampling_params must be vllm.SamplingParams")
        for p in prompts:
            if not isinstance(p, dict) or not all(isinstance(t, int) for t in p.get("prompt_token_ids", [None])):
                raise TypeError(f"prompt must be a TokensPrompt with prompt_token_ids, got {p!r}")
        self.last_sampling_params, self.last_prompts = sampling_params, list(prompts)
        generator = torch.Generator()
        generator.manual_seed(sampling_params.seed if sampling_params.seed is not None else torch.seed())
        outputs = [
            RequestOutput(
                request_id=str(i),
                prompt=None,
                prompt_token_ids=p["prompt_token_ids"],
                prompt_logprobs=None,
                outputs=[self._sample(p["prompt_token_ids"], j, sampling_params, generator) for j in range(sampling_params.n)],
            )
            for i, p in enumerate(prompts)
        ]
        self.last_outputs = outputs
        return outputs

    def _sample(self, prompt: list[int], index: int, sp: SamplingParams, generator) -> CompletionOutput:
        tokens, logprobs, prev, finish, stop_reason = [], [], prompt[-1], "length", None
        while len(tokens) < sp.max_tokens:
            raw = self._bigram_logits[prev]
            scaled = raw / max(sp.temperature, 1e-5)
            if sp.top_k != -1:
                scaled = scaled.masked_fill(scaled < scaled.topk(sp.top_k).values[-1], float("-inf"))
            probs = scaled.softmax(-1)
            if sp.top_p < 1:
                sorted_probs, order = probs.sort(descending=True)
                drop = (sorted_probs.cumsum(0) - sorted_probs) > sp.top_p
                probs[order[drop]] = 0
            token = int(torch.multinomial(probs, 1, generator=generator))
            tokens.append(token)
            logprobs.append({token: Logprob(logprob=float(raw.log_softmax(-1)[token]), rank=1)})
            prev = token
            if token in sp.stop_token_ids:
                finish, stop_reason = "stop", token
                break
        return CompletionOutput(
            index=index,
            text=_Tokenizer().decode(tokens, skip_special_tokens=True),
            token_ids=tokens,
            cumulative_logprob=sum(next(iter(d.values())).logprob for d in logprobs),
            logprobs=None if self.drop_logprobs or sp.logprobs is None else logprobs,
            finish_reason=finish,
            stop_reason=stop_reason,
        )


def install(monkeypatch) -> types.ModuleType:
    """Put this fake in sys.modules as `vllm` (with `vllm.inputs`, `vllm.outputs`, `vllm.logprobs`)."""
    vllm = types.ModuleType("vllm")
    inputs = types.ModuleType("vllm.inputs")
    outputs = types.ModuleType("vllm.outputs")
    logprobs = types.ModuleType("vllm.logprobs")
    inputs.TokensPrompt = TokensPrompt
    outputs.RequestOutput, outputs.CompletionOutput = RequestOutput, CompletionOutput
    logprobs.Logprob = Logprob
    vllm.LLM, vllm.SamplingParams, vllm.TokensPrompt = LLM, SamplingParams, TokensPrompt
    vllm.RequestOutput, vllm.CompletionOutput = RequestOutput, CompletionOutput
    vllm.inputs, vllm.outputs, vllm.logprobs = inputs, outputs, logprobs
    for name, module in {"vllm": vllm, "vllm.inputs": inputs, "vllm.outputs": outputs, "vllm.logprobs": logprobs}.items():
        monkeypatch.setitem(sys.modules, name, module)
    return vllm
