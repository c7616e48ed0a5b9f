"""Online RL for LLM math reasoning with any polopt loss: Algorithm 1 of the NFT paper.

    polopt train --config tiny_arith loss=nft                      # = tune run recipes/online_rl_distributed.py ...
    polopt train --nproc_per_node 2 --config tiny_arith loss=grpo
    PYTHONPATH=. tune run recipes/online_rl_distributed.py --config configs/tiny_arith.yaml   # the same, by hand

One step of this recipe is one policy iteration:

    groups = sampler.sample(seed)             # K answers per prompt, verified; keep 0 < r̂ < 1
    batch  = RolloutBatch.collate(groups)     # tokens, masks, old log-probs, rewards, group ids, r̂
    for minibatch in batch.split(num_minibatches):          # whole groups; one optimiser step each
        for micro in minibatch.split(gradient_accumulation_steps):
            loss = loss_fn(log π_θ, log π_old, mask, r, group ids; normaliser of the whole minibatch)
            loss.backward()
        clip gradients; AdamW step; LR schedule step (skipped if the loss is not finite)
    push weights to the rollout engine; validate (avg@k); checkpoint

Many ranks (polopt/topology.py): the model is sharded over every rank with FSDP2 (gloo on CPU, NCCL
on GPU); `rollout.engine.tensor_parallel_size` consecutive ranks share one vLLM engine and one data
shard (num_prompts / data shards prompts each). Mini-batches are cut from the *global* batch
(polopt/minibatches.py): `num_minibatches` optimiser steps per rollout on any number of ranks, the
answers of a mini-batch dealt to the ranks, and the loss of every micro-batch divided by the
normaliser of the whole mini-batch (all-reduced), so that gradient accumulation and ranks add up to
exactly the loss and gradient of the whole mini-batch. Under FSDP2 the native engine generates with
an unsharded replica per rank, refreshed after every step (the same contract as vLLM).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torchtune import config, modules, training, utils
from torchtune.recipe_interfaces import FTRecipeInterface
from tqdm import tqdm

from polopt.batch import PromptGroup, RolloutBatch, group_rows
from polopt.checkpoint import (
    latest_checkpoint,
    load_hf_model,
    load_training_state,
    rng_state,
    save_hf_model,
    save_training_state,
    set_rng_state,
)
from polopt.errors import UserError
from polopt.evaluation import evaluate_prompts, merge_counts
from polopt.losses import get_loss, global_normalizer, loss_hparams
from polopt.metrics import MetricSums
from polopt.minibatches import GroupShape, MinibatchShare, exchange_rows, micro_batches, plan_minibatches
from polopt.policy import response_logprobs
from polopt.prompts import DEFAULT_TEMPLATE, PromptStream, prompt_dataset
from polopt.recipe_config import (
    ConfigError,
    describe_user_error,
    instantiate_component,
    validate_config,
)
from polopt.rollout import SamplingParams
from polopt.rollout.correction import RolloutCorrection
from polopt.rollout.sampler import DynamicSampler
from polopt.rollout_worker import (
    InlineProducer,
    ProcessProducer,
    ProducerSpec,
    Rollout,
    build_engine,
    engine_takes_model,
    prompt_stream,
    rollout_sampling_params,
)
from polopt.run_dir import claim_output_dir, remove_unstarted_run, write_results, write_run_config
from polopt.runtime import set_cpu_threads
from polopt.tokenizer import check_tokenizer
from polopt.seeds import rollout_seed, validation_seed
from polopt.topology import Topology

log = utils.get_logger("INFO")


class OnlineRLRecipe(FTRecipeInterface):
    """Rollout → verify → filter → update, for any loss in `polopt.losses`."""

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg = validate_config(cfg)
        self._device = utils.get_device(device=cfg.device)
        self._dtype = training.get_dtype(cfg.dtype, device=self._device)
        self._distributed = training.is_distributed() and int(os.environ.get("WORLD_SIZE", 1)) > 1
        if self._distributed:
            # On GPUs, NCCL for the model's collectives and gloo for the CPU tensors and objects the
            # recipe all-reduces and gathers (metrics, normalisers, the mini-batch plan).
            dist.init_process_group(training.get_distributed_backend(
                self._device.type, offload_ops_to_cpu=self._device.type != "cpu"
            ))
        self.world_size, self.rank = utils.get_world_size_and_rank()
        self._is_rank_zero = self.rank == 0
        self.max_staleness = self._check_max_staleness(cfg)
        # A rollout producer process (staleness k ≥ 1) takes half of this rank's share of the cores.
        self.num_threads = set_cpu_threads(cfg.num_threads, self._device, processes_per_rank=2 if self.max_staleness else 1)
        self.topology = Topology.from_launch(
            self.world_size, self.rank, cfg.rollout.engine.get("tensor_parallel_size", 1)
        )
        self.prompts_per_shard = self.topology.per_shard(cfg.rollout.num_prompts, "rollout.num_prompts")
        self.gen_batch_per_shard = (
            self.topology.per_shard(cfg.filter.gen_batch_size, "filter.gen_batch_size")
            if cfg.filter.gen_batch_size else self.prompts_per_shard
        )
        if cfg.num_minibatches > cfg.rollout.num_prompts:
            raise ConfigError(
                f"num_minibatches={cfg.num_minibatches} is more than rollout.num_prompts={cfg.rollout.num_prompts}: "
                "a mini-batch holds at least one prompt's group; set num_minibatches <= rollout.num_prompts",
                "num_minibatches",
            )
        self._tp_group = self._new_tp_group()
        self.producer = None
        self._resumed_in_flight: list[Rollout] = []
        self._resumed_stream_state: Optional[dict] = None
        self.output_dir = Path(cfg.output_dir)
        self._output_dir_is_new = self._claim_output_dir(cfg)
        self.seed = training.set_seed(seed=cfg.seed)
        self.global_step = 0
        self.nan_steps = 0
        self.history: list[dict[str, float]] = []

    @staticmethod
    def _check_max_staleness(cfg: DictConfig) -> int:
        k = cfg.rollout.get("max_staleness", 0)
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ConfigError(f"rollout.max_staleness={k!r} must be an integer >= 0 (0: synchronous)", "rollout.max_staleness")
        if k and not engine_takes_model(cfg.rollout.engine):
            raise ConfigError(
                f"rollout.max_staleness={k} runs the native engine in a producer process; set "
                "rollout.engine._component_=polopt.rollout.NativeRolloutEngine, or rollout.max_staleness=0 with vLLM",
                "rollout.max_staleness",
            )
        if k and not cfg.recompute_old_logprobs:
            raise ConfigError(
                f"rollout.max_staleness={k} needs recompute_old_logprobs: true: the loss's ratio is taken against "
                "the trainer's policy at the update (π_old), not the stale policy that sampled (docs/rollout.md)",
                "recompute_old_logprobs",
            )
        if k and not cfg.rollout_correction.get("enabled", False):
            raise ConfigError(
                f"rollout.max_staleness={k} needs rollout_correction.enabled=true: the decoupled objective weighs each "
                "token by π_old / π_behaviour (docs/rollout.md); without it a stale rollout is trained as if the "
                "current policy had sampled it", "rollout_correction.enabled",
            )
        return k

    def _new_tp_group(self):
        """The process group of this rank's TP group (None at TP size 1): the ranks sharing an
        engine agree through it on every generation call. `new_group` is collective: every rank
        creates every group."""
        tp = self.topology.tensor_parallel_size
        if tp == 1 or not self._distributed:
            return None
        mine = None
        for start in range(0, self.world_size, tp):
            group = dist.new_group(list(range(start, start + tp)))
            if self.rank in range(start, start + tp):
                mine = group
        return mine

    def _claim_output_dir(self, cfg: DictConfig) -> bool:
        """Whether this run starts `output_dir` afresh; the folder policy is `polopt.run_dir`'s."""
        return claim_output_dir(self.output_dir, cfg)

    def _write_run_config(self) -> None:
        if self._is_rank_zero:
            write_run_config(self.output_dir, self.cfg)

    def abandon(self) -> None:
        """After an error: close what holds files open, and remove an output_dir this run created
        if it failed before its first step (nothing in it is worth keeping)."""
        for closeable in (getattr(self, "producer", None), getattr(self, "metric_logger", None), getattr(self, "verifier", None)):
            try:
                if closeable is not None and hasattr(closeable, "close"):
                    closeable.close()
            except Exception:  # noqa: BLE001 - the original error is the one to report
                pass
        if self._is_rank_zero and self._output_dir_is_new and self.global_step == 0:
            remove_unstarted_run(self.output_dir)

    # ------------------------------------------------------------------ setup
    def setup(self, cfg: Optional[DictConfig] = None) -> None:
        cfg = self.cfg
        self.loss_fn = self._setup_loss(cfg)
        self._checkpointer, model_state = load_hf_model(cfg.checkpointer)
        self.tokenizer = instantiate_component(cfg.tokenizer, "tokenizer")
        self.model = self._setup_model(cfg, model_state)
        check_tokenizer(self.tokenizer, vocab_size=self.model.tok_embeddings.num_embeddings)
        self.optimizer = instantiate_component(cfg.optimizer, "optimizer", self.model.parameters())
        self.lr_scheduler = instantiate_component(
            cfg.lr_scheduler, "lr_scheduler", self.optimizer, num_training_steps=cfg.max_steps
        )
        self.verifier = instantiate_component(cfg.verifier, "verifier")
        self.engine = self._setup_rollout_engine(cfg, model_state)
        self.prompt_stream = self._setup_prompts(cfg)
        self.sampler = DynamicSampler(
            self.prompt_stream,
            self.engine,
            self.verifier,
            num_prompts=self.prompts_per_shard,
            num_samples=cfg.rollout.num_samples,
            params=self._sampling_params("rollout"),
            max_gen_batches=cfg.filter.max_gen_batches,
            filter_groups=cfg.filter.enabled,
            agree=self._tp_agree,
        )
        self.val_prompts = self._setup_validation(cfg)
        self._write_run_config()
        self.metric_logger = instantiate_component(cfg.metric_logger, "metric_logger") if self._is_rank_zero else None
        if self.metric_logger is not None:
            self.metric_logger.log_config(cfg)
        if cfg.resume:
            self.load_checkpoint()

    def _setup_loss(self, cfg: DictConfig):
        """The loss from the registry; `validate_config` has imported `loss_modules` (a user's own
        `@register_loss` classes) and checked `loss_args` against the registered signatures."""
        section = cfg.loss_args.get(cfg.loss)
        kwargs = OmegaConf.to_container(section, resolve=True) if section is not None else {}
        if "max_response_len" in loss_hparams(cfg.loss):
            # L of seq-mean-token-sum-norm (Dr.GRPO's B·L) must be a constant of the run, not the
            # longest answer of each batch and rank; other aggregations do not read it.
            kwargs.setdefault("max_response_len", cfg.rollout.max_new_tokens)
        try:
            loss_fn = get_loss(cfg.loss, **kwargs)
        except (KeyError, ValueError, TypeError) as e:
            raise ConfigError(f"loss={cfg.loss} with loss_args.{cfg.loss}={kwargs}: {e}", f"loss_args.{cfg.loss}") from e
        if getattr(loss_fn, "kl_coef", 0.0) > 0:
            raise ConfigError(
                f"loss_args.{cfg.loss}.kl_coef={loss_fn.kl_coef}: the KL term needs a reference policy's log-probs, "
                f"which this recipe does not compute; set loss_args.{cfg.loss}.kl_coef=0 (the losses take "
                "ref_logprobs= when called from your own trainer)", f"loss_args.{cfg.loss}.kl_coef"
            )
        return loss_fn

    def _setup_model(self, cfg: DictConfig, model_state: dict[str, torch.Tensor]) -> torch.nn.Module:
        with training.set_default_dtype(self._dtype), torch.device("meta" if self._distributed else self._device):
            model = instantiate_component(cfg.model, "model")
        if cfg.enable_activation_checkpointing:
            training.set_activation_checkpointing(model, auto_wrap_policy={modules.TransformerSelfAttentionLayer})
        if not self._distributed:
            model.load_state_dict(model_state)
            return model
        training.shard_model(
            model=model,
            shard_conditions=[partial(training.get_shard_conditions, names_to_match=None)],
            cpu_offload=False,
            reshard_after_forward=True,
        )
        with training.set_default_dtype(self._dtype), self._device:
            for m in model.modules():
                if hasattr(m, "rope_init"):  # RoPE buffers are not in the state dict
                    m.rope_init()
        training.load_from_full_model_state_dict(model, model_state, self._device, strict=True)
        training.validate_no_params_on_meta_device(model)
        dist.barrier()
        return model

    def _setup_rollout_engine(self, cfg: DictConfig, model_state: dict[str, torch.Tensor]):
        self.rollout_correction = _setup_rollout_correction(cfg)
        if not engine_takes_model(cfg.rollout.engine):
            # vLLM's and the engine's own construction errors are about the config (memory,
            # tensor_parallel_size, max_model_len, ...)
            engine = build_engine(cfg.rollout.engine, self.tokenizer)
            try:
                # Checks the engine's model against the trainer's before step 1, and starts both
                # from the same weights (the engine loaded its own checkpoint).
                engine.sync_weights(model_state)
            except ValueError as e:
                raise ConfigError(f"rollout.engine does not fit model ({cfg.model._component_}): {e}") from e
            return engine
        rollout_model = self.model
        if self._distributed:
            # FSDP forwards are collective; ranks stop generating at different times, so each
            # rank generates with its own unsharded replica (refreshed after every step).
            with training.set_default_dtype(self._dtype), self._device:
                rollout_model = instantiate_component(cfg.model, "model")
            rollout_model.load_state_dict(model_state)
        return build_engine(cfg.rollout.engine, self.tokenizer, rollout_model)

    def _setup_prompts(self, cfg: DictConfig) -> PromptStream:
        stream = prompt_stream(cfg, self.tokenizer, self.topology, self.gen_batch_per_shard)
        stream.dataset.check_fits(cfg.rollout.max_new_tokens, self.model.max_seq_len,
                                  max_new_tokens_key="rollout.max_new_tokens")
        return stream

    def _setup_validation(self, cfg: DictConfig) -> list[dict]:
        """Held-out questions; their length limit is `validation.max_prompt_tokens`, not the
        training set's (dropping validation questions changes what is measured)."""
        v = cfg.validation
        if not v.source:
            return []
        dataset = prompt_dataset(
            self.tokenizer, v.source, split=v.split, question_field=v.question_field, answer_field=v.answer_field,
            template=v.template or cfg.dataset.get("template", DEFAULT_TEMPLATE), max_prompt_tokens=v.max_prompt_tokens,
            on_too_long=v.on_too_long, config_section="validation",
        )
        max_new_tokens_key = "validation.max_new_tokens" if v.max_new_tokens else "rollout.max_new_tokens"
        dataset.check_fits(v.max_new_tokens or cfg.rollout.max_new_tokens, self.model.max_seq_len,
                           max_new_tokens_key=max_new_tokens_key)
        questions = [dataset[i] for i in range(len(dataset))][: v.max_questions]
        return self.topology.data_shard(questions)

    def _sampling_params(self, key: str, seed: Optional[int] = None) -> SamplingParams:
        return rollout_sampling_params(self.cfg, self.tokenizer, key, seed=seed)

    # ------------------------------------------------------------------ one policy iteration
    def rollout(self) -> tuple[list[MinibatchShare], dict[str, float]]:
        """Sample, verify and filter; cut the kept groups of all ranks into this rank's shares of
        the global mini-batches (empty if no rank kept a group)."""
        self.model.eval()
        waited = time.perf_counter()
        rollout = self.producer.get(self.global_step)
        metrics = dict(rollout.metrics)
        if self.max_staleness:
            metrics["rollout/staleness"] = float(self.global_step - rollout.policy_version)
            metrics["time/trainer_wait_s"] = time.perf_counter() - waited
            metrics["time/producer_idle_s"] = rollout.idle_seconds
        minibatches = self.minibatches(self.topology.tp_slice(rollout.groups))
        metrics["optimizer_steps"] = float(len(minibatches))
        if self.cfg.recompute_old_logprobs:
            micros = [micro for minibatch in minibatches for micro in minibatch.micro_batches]
            with torch.no_grad():  # in the training micro-batches: R_t = 1 exactly at the first update
                for micro in micros:
                    micro.old_logprobs = self._logprobs(micro.to(self._device), entropy=False)[0].cpu() * micro.response_mask
            metrics.update(self._rollout_correction([m for m in micros if m.num_tokens]))
        return minibatches, metrics

    def _rollout_correction(self, micros: list[RolloutBatch]) -> dict[str, float]:
        """Set each micro-batch's `rollout_weights` from π_old and the engine's log-probs; the
        mismatch metrics are over all this rank's answers at once (they hold minima and maxima)."""
        if not micros:
            return {}
        width = max(m.response_len for m in micros)
        pad = lambda t: torch.nn.functional.pad(t, (0, width - t.shape[1]))  # noqa: E731
        weights, metrics = self.rollout_correction.weights(
            torch.cat([pad(m.old_logprobs) for m in micros]),
            torch.cat([pad(m.rollout_logprobs) for m in micros]),
            torch.cat([pad(m.response_mask) for m in micros]),
        )
        if weights is not None:
            for micro, rows in zip(micros, weights.split([len(m) for m in micros])):
                micro.rollout_weights = rows[:, : micro.response_len].contiguous()
        return metrics

    def minibatches(self, groups: list[PromptGroup]) -> list[MinibatchShare]:
        """This rank's shares of the global batch's `num_minibatches` mini-batches, each cut into
        `gradient_accumulation_steps` micro-batches (polopt/minibatches.py): every rank gets the same
        number of both, whatever it kept, so FSDP's collective forwards and backwards line up."""
        shapes = [GroupShape(len(g.completions), sum(len(c.token_ids) for c in g.completions)) for g in groups]
        every_rank = self._all_gather(shapes)
        whole_groups = self.loss_fn.needs_whole_groups
        plan = plan_minibatches(
            every_rank, self.cfg.num_minibatches, whole_groups=whole_groups,
            balance_tokens=self.cfg.balance_minibatch_tokens,
        )
        if 0 < plan.num_minibatches < self.cfg.num_minibatches and self._is_rank_zero:
            log.warning(f"step {self.global_step}: {plan.num_groups} group(s) kept over all ranks, fewer than "
                        f"num_minibatches={self.cfg.num_minibatches}: {plan.num_minibatches} optimiser step(s)")
        local_rows = [group_rows([g]) for g in groups]
        shares = exchange_rows(plan, self.rank, local_rows, self._scatter if self._distributed else None)
        pad_id = self.tokenizer.pad_id
        out = []
        for rows in shares:
            share = RolloutBatch.collate_rows(rows, pad_id) if rows else None
            out.append(MinibatchShare(
                share, micro_batches(share, self.cfg.gradient_accumulation_steps, whole_groups, pad_id), plan.num_tokens
            ))
        return out

    def update_policy(self, minibatches: list[MinibatchShare]) -> MetricSums:
        """Algorithm 1, lines 9-12: one optimiser step per mini-batch of the global batch.

        Every rank calls this with its own share of each mini-batch, cut into the same number of
        micro-batches on every rank (`minibatches`), since FSDP's forward and backward are collective.
        """
        self.model.train()
        metrics = MetricSums()
        for minibatch in minibatches:
            normalizer = self._global_normalizer(minibatch.share)
            step_metrics, local_loss = MetricSums(), 0.0
            for micro in minibatch.micro_batches:
                micro = micro.to(self._device)
                logprobs, entropy = self._logprobs(micro)
                out = self.loss_fn(
                    logprobs, micro.old_logprobs, micro.response_mask, micro.rewards, micro.group_ids,
                    correct_rate=micro.correct_rate, normalizer=normalizer, token_weights=micro.rollout_weights,
                )
                # FSDP2 averages gradients over ranks; the normaliser is global, so scale back to a sum.
                (out.loss * self.world_size).backward()
                local_loss += out.loss.item()
                if micro.num_tokens:  # a placeholder's metrics describe nothing
                    step_metrics.add("entropy", (entropy * micro.response_mask).sum().item(), weight=micro.num_tokens)
                    step_metrics.add_means(out.metrics)
            optimizer_metrics = self._optimizer_step(local_loss)
            if optimizer_metrics is not None:  # a skipped step's metrics are not logged
                step_metrics.add_means(optimizer_metrics)
                metrics.merge(step_metrics)
        metrics.add("lr", self.optimizer.param_groups[0]["lr"])
        return metrics

    def _optimizer_step(self, local_loss: float) -> Optional[dict[str, float]]:
        """Clip the gradients, step the optimiser and the LR schedule; returns the mini-batch's
        global loss (and gradient norm). If that loss is not finite on any rank, the gradients
        are dropped instead, the skip counted (more than `max_nan_steps` stops the run) and None
        returned."""
        loss = self._all_reduce(torch.tensor(local_loss, dtype=torch.float64)).item()
        if not math.isfinite(loss):
            self.optimizer.zero_grad(set_to_none=True)
            self.nan_steps += 1
            log.warning(f"step {self.global_step}: non-finite loss, optimiser step skipped ({self.nan_steps} so far)")
            if self.nan_steps > self.cfg.max_nan_steps:
                raise RuntimeError(f"{self.nan_steps} non-finite losses (max_nan_steps={self.cfg.max_nan_steps}); stopping")
            return None
        stats = {"loss": loss}
        if self.cfg.clip_grad_norm is not None:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm=float(self.cfg.clip_grad_norm))
            stats["grad_norm"] = (grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm).item()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.lr_scheduler.step()
        return stats

    def _logprobs(self, batch: RolloutBatch, entropy: bool = True) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        return response_logprobs(
            self.model,
            batch,
            temperature=self.sampler.params.temperature,  # log π_θ at the temperature the answers were sampled with
            fused=self.cfg.fused_logprobs,
            chunk_size=self.cfg.logprob_chunk_size,
            return_entropy=entropy,
            pack=self.cfg.pack_sequences,
        )

    # ------------------------------------------------------------------ cross-rank agreement
    def _global_normalizer(self, share: Optional[RolloutBatch]) -> float:
        """The loss's denominator for the whole mini-batch over all ranks (token count, sequence
        count, ...), so that micro-batches and ranks add up to the mini-batch's loss."""
        if share is None:  # this rank holds none of the mini-batch: it adds nothing to the count
            mask, group_ids = torch.zeros((0, 1), dtype=torch.bool), torch.zeros(0, dtype=torch.long)
        else:
            mask, group_ids = share.response_mask, share.group_ids
        local = torch.as_tensor(global_normalizer(self.loss_fn, mask, group_ids=group_ids), dtype=torch.float64)
        # token-sum has no denominator (1 on every rank): summing it would scale the loss.
        return (local if self.loss_fn.normalizer_kind == "none" else self._all_reduce(local)).item()

    def _all_gather(self, obj: Any) -> list[Any]:
        if not self._distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def _scatter(self, src: int, objects: Optional[list]) -> Any:
        out: list[Any] = [None]
        dist.scatter_object_list(out, objects, src=src)
        return out[0]

    def _tp_agree(self, condition: bool) -> bool:
        """True on every rank of this TP group iff true on all of them: the ranks sharing an engine
        must make the same generation calls, or the engine's collectives hang."""
        if self._tp_group is None:
            return condition
        flag = torch.tensor(float(condition))
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self._tp_group)
        return flag.item() > 0

    def _reduce_metrics(self, metrics: MetricSums) -> dict[str, float]:
        """`MetricSums.reduce` over ranks, on the union of every rank's metric names."""
        if not self._distributed:
            return metrics.reduce()
        names: list[Optional[list[str]]] = [None] * self.world_size
        dist.all_gather_object(names, metrics.names)
        return metrics.reduce(self._all_reduce, names=sorted(set().union(*names)))

    def validate(self) -> dict[str, float]:
        if not self.val_prompts and not self._distributed:
            return {}
        v = self.cfg.validation
        self.model.eval()
        part = evaluate_prompts(
            self.engine,
            self.verifier,
            self.val_prompts,
            k=v.k,
            params=self._sampling_params("validation", seed=validation_seed(self.seed, self.topology.dp_rank)),
            batch_size=v.batch_size,
            progress=self._is_rank_zero,
            desc="validation",
        )
        if self._distributed:
            counts = torch.tensor([part["correct"], part["solved"], part["n_questions"]], dtype=torch.float64)
            counts = self._all_reduce(counts * float(self.topology.counts_results))  # each TP group's questions once
            part.update(correct=counts[0].item(), solved=counts[1].item(), n_questions=counts[2].item())
            part = merge_counts([part])
        return {"val/accuracy": part["avg_at_k"], "val/pass_at_k": part["pass_at_k"]}

    # ------------------------------------------------------------------ loop
    def _setup_producer(self):
        """The rollout producer (polopt/rollout_worker.py): the trainer's own sampler at staleness 0,
        a child process with its own weights ahead of the trainer at staleness k ≥ 1."""
        k = self.max_staleness
        # Seeded per (run seed, step, data shard): a resumed run samples exactly what the original did.
        if k == 0:
            return InlineProducer(self.sampler, lambda step: rollout_seed(self.seed, step, self.topology.dp_rank))
        spec = ProducerSpec(
            config=OmegaConf.to_container(self.cfg, resolve=True), topology=self.topology, seed=self.seed,
            num_prompts=self.prompts_per_shard, gen_batch_size=self.gen_batch_per_shard,
            num_threads=self.num_threads, max_steps=self.cfg.max_steps, max_staleness=k,
            start_step=self.global_step + len(self._resumed_in_flight),
            stream_state=self._resumed_stream_state,
            weights={name: w.detach().clone() for name, w in self._full_state_dict().items()},
            weights_version=self.global_step,
        )
        return ProcessProducer(spec, pending=self._resumed_in_flight)

    def train(self) -> None:
        cfg = self.cfg
        self.producer = self._setup_producer()
        start = time.perf_counter()
        if self.global_step == 0 and self.val_prompts is not None and cfg.validation.source:
            self._record(0, self.validate())
        bar = tqdm(total=cfg.max_steps, initial=self.global_step, desc=f"{cfg.loss}", disable=not self._is_rank_zero)
        while self.global_step < cfg.max_steps:
            t0, t0_cpu = time.perf_counter(), time.process_time()
            minibatches, rollout_metrics = self.rollout()
            t_rollout = time.perf_counter() - t0
            step_metrics = MetricSums()
            step_metrics.add_means(rollout_metrics)
            if minibatches:
                step_metrics.merge(self.update_policy(minibatches))
            elif self._is_rank_zero:
                log.warning(f"step {self.global_step}: no rank kept a group after filtering; update skipped")
            metrics = self._reduce_metrics(step_metrics)
            if minibatches:
                metrics["tokens_per_second"] = minibatches[0].global_tokens / max(1e-9, time.perf_counter() - t0)
            self.global_step += 1
            self._sync_rollout_weights()
            metrics["time/rollout_s"] = t_rollout
            metrics["time/step_s"] = time.perf_counter() - t0
            metrics["time/step_cpu_s"] = time.process_time() - t0_cpu  # this process's threads, not the neighbours'
            every = cfg.validation.every_n_steps
            if cfg.validation.source and every and (self.global_step % every == 0 or self.global_step == cfg.max_steps):
                metrics.update(self.validate())
            self._record(self.global_step, metrics)
            bar.set_postfix(self._progress(metrics), refresh=False)
            bar.update(1)
            if cfg.checkpoint_every_n_steps and self.global_step % cfg.checkpoint_every_n_steps == 0:
                self.save_checkpoint()
        bar.close()
        self.wall_seconds = time.perf_counter() - start
        self._finish()

    def _progress(self, metrics: dict[str, float]) -> dict[str, str]:
        """What moves during a run: rollout reward, the latest held-out accuracy, the gradient norm
        and the loss's own `progress_metric` (clip fractions, ...). Not the loss value: on-policy it
        is ~0 by construction (R_t = 1 at the first step of every update), whatever is learnt."""
        latest_val = next((h["val/accuracy"] for h in reversed(self.history) if "val/accuracy" in h), None)
        shown = {"reward": metrics.get("reward/mean"), "val_acc": latest_val, "grad_norm": metrics.get("grad_norm")}
        key = getattr(self.loss_fn, "progress_metric", None)
        if key:
            shown[key] = metrics.get(key)
        return {name: f"{value:.3f}" for name, value in shown.items() if value is not None}

    def _record(self, step: int, metrics: dict[str, float]) -> None:
        entry = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        self.history.append(entry)
        if self.metric_logger is not None and step % self.cfg.log_every_n_steps == 0:
            self.metric_logger.log_dict({k: v for k, v in entry.items() if k != "step"}, step=step)

    def _sync_rollout_weights(self) -> None:
        """The new weights to whoever generates: synchronously, streamed into the engine one full
        tensor at a time (a rank holds one gathered parameter plus the engine's bucket, never the
        whole model); with a producer process (staleness k ≥ 1), gathered once for it and for the
        trainer's own engine (validation)."""
        engine_is_trainer = getattr(self.engine, "model", None) is self.model  # generates with the module trained
        if self.producer is None or not self.max_staleness:
            if not engine_is_trainer:
                self.engine.sync_weights(self._full_tensors())
            return
        weights = self._full_state_dict()
        if not engine_is_trainer:
            self.engine.sync_weights(weights)
        self.producer.push_weights(self.global_step, lambda: weights)

    def _full_tensors(self):
        """(name, full tensor) per weight, gathered on demand: under FSDP2 `full_tensor` is a
        collective, and every rank walks the same state dict in the same order."""
        for name, value in self.model.state_dict().items():
            yield name, (value.full_tensor() if hasattr(value, "full_tensor") else value).detach()

    def _full_state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self._full_tensors())

    def _all_reduce(self, t: torch.Tensor, op=None) -> torch.Tensor:
        if self._distributed:
            dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
        return t

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> None:
        """Sharded: each rank writes its model/optimiser shards and its own data position (DCP)."""
        path = save_training_state(
            self.output_dir,
            self.global_step,
            self.model,
            self.optimizer,
            trainer_state={
                "lr_scheduler": self.lr_scheduler.state_dict(),
                "history": self.history,
                "nan_steps": self.nan_steps,
                "config": OmegaConf.to_container(self.cfg, resolve=True),
            },
            # The stream position belongs to this rank's data shard (its TP group's, polopt/topology.py).
            rank_state={
                "data_shard": self._data_shard(),
                # Rollouts already made for the coming steps (staleness k ≥ 1), and the prompt
                # position after them: a resumed producer continues from there.
                "in_flight": [r.to_json() for r in self.producer.in_flight(self.global_step)],
                "prompt_stream": self.producer.stream_state(),
                "rng": rng_state(),
            },
            keep_last=self.cfg.keep_last_checkpoints,
        )
        if self._is_rank_zero:
            log.info(f"checkpoint written: {path}")

    def _data_shard(self) -> dict[str, int]:
        return {"dp_rank": self.topology.dp_rank, "dp_size": self.topology.dp_size}

    def load_checkpoint(self) -> None:
        path = latest_checkpoint(self.output_dir)
        if path is None:
            log.info(f"resume=True but no checkpoint under {self.output_dir}/checkpoints: starting fresh")
            return
        trainer_state, rank_state = load_training_state(path, self.model, self.optimizer)
        self.lr_scheduler.load_state_dict(trainer_state["lr_scheduler"])
        saved_shard = rank_state.get("data_shard", self._data_shard())
        if saved_shard != self._data_shard():
            raise ConfigError(
                f"{path} was written with data shards {saved_shard} on this rank and this run has {self._data_shard()}: "
                f"its prompt position belongs to another shard; resume with the saved rollout.engine.tensor_parallel_size",
                "rollout.engine.tensor_parallel_size",
            )
        if self.max_staleness:
            self._resumed_in_flight = [Rollout.from_json(r) for r in rank_state.get("in_flight", [])]
            self._resumed_stream_state = rank_state["prompt_stream"]
        else:
            self.prompt_stream.load_state_dict(rank_state["prompt_stream"])
        set_rng_state(rank_state["rng"])
        self.history = trainer_state["history"]
        self.nan_steps = trainer_state["nan_steps"]
        self.global_step = trainer_state["step"]
        self._sync_rollout_weights()
        log.info(f"resumed from {path} (step {self.global_step})")

    # ------------------------------------------------------------------ outputs
    def _finish(self) -> None:
        model_state = self._full_state_dict()
        if not self._is_rank_zero:
            return
        val = [h for h in self.history if "val/accuracy" in h]
        summary = {
            "loss": self.cfg.loss,
            "steps": self.global_step,
            "wall_seconds": round(self.wall_seconds, 2),
            "val_accuracy_before": val[0]["val/accuracy"] if val else None,
            "val_accuracy_after": val[-1]["val/accuracy"] if val else None,
            "nan_steps": self.nan_steps,
            "world_size": self.world_size,
        }
        if self.cfg.save_final_model:
            checkpointer_cfg = self.cfg.checkpointer
            factory = lambda out: config.instantiate(checkpointer_cfg, output_dir=out)  # noqa: E731
            final = save_hf_model(
                factory, {k: v.cpu() for k, v in model_state.items()}, self.output_dir, self._checkpointer,
                training_info=self._training_info(summary),
            )
            summary["final_model"] = str(final)
            log.info(f"final model (HF format): {final}; evaluate it with "
                     f"`polopt evaluate --config evaluate model_dir={final}`")
        write_results(self.output_dir, self.history, summary, title=f"loss={self.cfg.loss}")
        log.info("summary: " + json.dumps(summary))

    def _training_info(self, summary: dict[str, Any]) -> dict[str, Any]:
        """`final/polopt.json`: how this model was trained (the full config is output_dir/config.yaml)."""
        cfg = self.cfg
        return {
            "trained_with": "polopt recipes/online_rl_distributed.py",
            "base_model": str(cfg.checkpointer.get("checkpoint_dir", cfg.get("model_dir"))),
            "loss": cfg.loss,
            "loss_args": OmegaConf.to_container(cfg.loss_args.get(cfg.loss) or OmegaConf.create({}), resolve=True),
            "dataset": str(cfg.dataset.source),
            "steps": summary["steps"],
            "val_accuracy_before": summary["val_accuracy_before"],
            "val_accuracy_after": summary["val_accuracy_after"],
            "run_config": str(self.output_dir / "config.yaml"),
        }

    def cleanup(self) -> None:
        if self.producer is not None:
            self.producer.close()
        if self.metric_logger is not None:
            self.metric_logger.close()
        if hasattr(self.verifier, "close"):
            self.verifier.close()
        if self._distributed:
            dist.barrier()  # without it, an occasional rank aborts at exit (docs/design.md, toolchain facts)
        if hasattr(self.engine, "close"):
            self.engine.close()  # vLLM's shutdown also destroys the default process group
        if self._distributed and dist.is_initialized():
            dist.destroy_process_group()


def _setup_rollout_correction(cfg: DictConfig) -> RolloutCorrection:
    correction = instantiate_component(cfg.rollout_correction, "rollout_correction")
    if correction.enabled and not cfg.recompute_old_logprobs:
        raise ConfigError(
            "rollout_correction.enabled needs recompute_old_logprobs: true (without the trainer's own "
            "log-probs there is no mismatch to correct)"
        )
    return correction


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    """User errors (`UserError`: config, data, paths) print one line and exit 2; bugs keep their
    traceback. A run that fails before its first step leaves no output_dir behind."""
    recipe = None
    try:
        recipe = OnlineRLRecipe(cfg)
        recipe.setup()
        recipe.train()
    except (UserError, FileNotFoundError) as e:
        if recipe is not None:
            recipe.abandon()
        print(describe_user_error(e, sys.argv), file=sys.stderr)
        sys.exit(2)
    except BaseException:
        if recipe is not None:
            recipe.abandon()
        raise
    recipe.cleanup()


if __name__ == "__main__":
    sys.exit(recipe_main())
