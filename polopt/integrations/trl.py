"""NFT (or any polopt loss) inside TRL: `PoloptGRPOTrainer`, a `trl.GRPOTrainer` whose loss comes
from the polopt registry.

    trainer = PoloptGRPOTrainer(model=model, reward_funcs=is_correct, args=GRPOConfig(...),
                                train_dataset=dataset, processing_class=tokenizer,
                                loss="nft", loss_kwargs={"epsilon": 1.0})

TRL has no loss hook; this overrides its private `_compute_loss`, so it is pinned to the TRL
versions it was tested with. What TRL does and what the subclass adds:
- TRL generates `num_generations` completions per prompt as consecutive rows of the generation
  batch (gathered across processes), computes rewards on all of them, then slices each process's
  rows, shuffles and splits them into `steps_per_generation` micro-batches. Before that shuffle,
  `_generate_and_score_completions` here attaches to every row its binary reward, its group id
  (global row // num_generations) and r̂ of its whole group, so micro-batches holding part of a
  group (or a group split across processes) still see the whole group's r̂.
- The loss of each micro-batch uses the global normalizer of the generation batch (all
  processes), times num_processes (DDP averages gradients), over gradient_accumulation_steps /
  steps_per_generation windows: with steps_per_generation == gradient_accumulation_steps (TRL's
  default) the accumulated gradient equals the gradient of the whole batch's loss exactly.
- Old log-probs: TRL's `old_per_token_logps` when it computed them (num_iterations > 1, or
  generation reused across steps), else the current ones detached (on-policy).
- TRL's own loss settings (loss_type, epsilon, scale_rewards, delta) are not used: loss_kwargs
  (polopt's names) define the loss. `beta` > 0 becomes the loss's k3 `kl_coef`.

`TRLLossFunction` (below) goes the other way: TRL's own loss for one GRPOConfig setting as the
conformance kit's function, for docs/conformance_report.md and tests/test_conformance_peers.py.
"""

from __future__ import annotations

import inspect
import os
import tempfile
from typing import Any, Optional

import torch
import trl
from trl import GRPOConfig, GRPOTrainer

from polopt.losses import get_loss, global_normalizer, group_correct_rate
from polopt.losses.registry import hparam_names

# Exactly the TRL releases the tests ran against (major.minor): `_compute_loss` is private API.
SUPPORTED_TRL = ">=1.16,<1.17"
SUPPORTED_TRL_MINORS = ((1, 16),)

# Keys added to TRL's batch dict; per-row tensors, so TRL's shuffle/split keeps them aligned.
REWARDS, GROUP_IDS, CORRECT_RATE, NORMALIZER = "polopt_rewards", "polopt_group_ids", "polopt_correct_rate", "polopt_normalizer"


def check_trl_version(version: Optional[str] = None) -> str:
    """The installed TRL version if it is one this integration was tested with, else a RuntimeError."""
    version = trl.__version__ if version is None else version
    try:
        major_minor = tuple(int(part) for part in version.split(".")[:2])
    except ValueError:
        major_minor = ()
    if major_minor not in SUPPORTED_TRL_MINORS:
        raise RuntimeError(
            f"polopt.integrations.trl supports trl{SUPPORTED_TRL} (it overrides GRPOTrainer's private "
            f"_compute_loss), but trl {version} is installed: pip install 'trl{SUPPORTED_TRL}'"
        )
    return version


check_trl_version()


def binary_rewards(rewards_per_func: torch.Tensor, weights: torch.Tensor, names: list[str], loss: str) -> torch.Tensor:
    """TRL's combined reward Σ_f w_f r_f per completion [N], checked to be 0 or 1 (ValueError naming the row)."""
    rewards = (rewards_per_func * weights.to(rewards_per_func.device)[None, :]).nansum(dim=1)
    unscorable = torch.isnan(rewards_per_func).all(dim=1)
    bad = unscorable | ((rewards != 0) & (rewards != 1))
    if bad.any():
        row = int(bad.nonzero()[0, 0])
        given = "None from every reward function" if unscorable[row] else f"{rewards[row].item():g}"
        per_func = ", ".join(f"{name}={value:g}" for name, value in zip(names, rewards_per_func[row].tolist()))
        raise ValueError(
            f"loss {loss!r} needs binary rewards (0 or 1), but completion {row} of the generation batch got "
            f"{given} (reward functions: {per_func}; weights {weights.tolist()}); "
            f"{int(bad.sum())} completion(s) are not 0/1"
        )
    return rewards


class PoloptGRPOTrainer(GRPOTrainer):
    """`trl.GRPOTrainer` with a polopt loss: `loss` (registry name) and `loss_kwargs` (its hyperparameters)."""

    def __init__(self, *args, loss: str = "nft", loss_kwargs: Optional[dict[str, Any]] = None, **kwargs) -> None:
        check_trl_version()
        config = kwargs["args"] if "args" in kwargs else (args[2] if len(args) > 2 else None)
        if config is None:
            raise ValueError("PoloptGRPOTrainer needs args=GRPOConfig(...) (num_generations, max_completion_length)")
        if not isinstance(config, GRPOConfig):
            raise TypeError(f"args must be a trl.GRPOConfig, got {type(config).__name__}")
        self.polopt_loss = build_loss(loss, dict(loss_kwargs or {}), config)
        super().__init__(*args, **kwargs)
        self._pending_rewards_per_func: Optional[torch.Tensor] = None

    # ------------------------------------------------------------------ data: rewards, groups, r̂

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._pending_rewards_per_func = rewards_per_func  # all processes' rows, in generation order
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        rewards_per_func, self._pending_rewards_per_func = self._pending_rewards_per_func, None
        num_generations = self.num_generations if self.model.training else self.num_generations_eval
        rewards = binary_rewards(rewards_per_func, self.reward_weights, self.reward_func_names, self.polopt_loss.name)
        group_ids = torch.arange(rewards.numel(), device=rewards.device) // num_generations
        correct_rate = group_correct_rate(rewards, group_ids)  # over all processes' rows: whole groups
        local_rows = output["completion_ids"].size(0)
        rows = slice(self.accelerator.process_index * local_rows, (self.accelerator.process_index + 1) * local_rows)
        output[REWARDS], output[GROUP_IDS], output[CORRECT_RATE] = rewards[rows], group_ids[rows], correct_rate[rows]
        output[NORMALIZER] = self.generation_batch_normalizer(loss_mask(output), group_ids, num_generations)
        return output

    def generation_batch_normalizer(self, mask: torch.Tensor, group_ids: torch.Tensor, num_generations: int) -> torch.Tensor:
        """The loss's denominator for the whole generation batch, all processes (a 0-dim tensor)."""
        kind = self.polopt_loss.normalizer_kind
        if kind == "groups":
            value = group_ids.numel() // num_generations
        elif kind == "none":
            value = 1.0
        else:  # additive over rows: sum the per-process values
            local = global_normalizer(self.polopt_loss, mask)
            value = self.accelerator.gather(torch.tensor([local], device=mask.device)).sum().item()
        return torch.tensor(float(value), device=mask.device)

    # ------------------------------------------------------------------ loss

    def _compute_loss(self, model, inputs):
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        logprobs, _, _ = self._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, completion_ids.size(1), **multimodal_kwargs(inputs)
        )
        old_logprobs = inputs.get("old_per_token_logps")
        old_logprobs = logprobs.detach() if old_logprobs is None else old_logprobs

        mode = "train" if self.model.training else "eval"
        normalizer = inputs[NORMALIZER]
        if mode == "train" and self.polopt_loss.normalizer_kind != "none":
            # One optimizer step sees gradient_accumulation_steps of the steps_per_generation micro-batches.
            normalizer = normalizer * self.current_gradient_accumulation_steps / self.args.steps_per_generation
        out = self.polopt_loss(
            logprobs,
            old_logprobs,
            loss_mask(inputs),
            inputs[REWARDS],
            inputs[GROUP_IDS],
            correct_rate=inputs[CORRECT_RATE],
            normalizer=normalizer,
            ref_logprobs=inputs.get("ref_per_token_logps"),
        )
        for name, value in out.metrics.items():
            self._metrics[mode][f"polopt/{name}"].append(value)
        # DDP averages gradients over processes; the normalizer is global, so undo the average.
        return out.loss * self.accelerator.num_processes


def loss_mask(inputs: dict) -> torch.Tensor:
    """TRL's loss mask: completion tokens, minus tool-output tokens in multi-turn rollouts."""
    mask = inputs["completion_mask"]
    return mask if "tool_mask" not in inputs else mask * inputs["tool_mask"]


MULTIMODAL_KEYS = (
    "pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes", "num_tiles",
    "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids",
)  # fmt: skip


def multimodal_kwargs(inputs: dict) -> dict:
    """The optional forward inputs TRL passes to `_get_per_token_logps_and_entropies` (those it accepts)."""
    accepted = inspect.signature(GRPOTrainer._get_per_token_logps_and_entropies).parameters
    return {key: inputs.get(key) for key in MULTIMODAL_KEYS if key in accepted}


def build_loss(name: str, loss_kwargs: dict[str, Any], config: GRPOConfig):
    """The polopt loss for a TRL run, after checking the TRL settings it depends on (ValueError naming them)."""
    if config.num_generations is None or config.num_generations < 2:
        raise ValueError(
            f"GRPOConfig.num_generations={config.num_generations}: polopt losses compare the answers to one "
            "prompt (r̂ = the group's correct rate), so each prompt needs num_generations >= 2"
        )
    unsupported = {
        "importance_sampling_level": (config.importance_sampling_level, "token"),
        "top_entropy_quantile": (config.top_entropy_quantile, 1.0),
        "off_policy_mask_threshold": (config.off_policy_mask_threshold, None),
    }
    for key, (value, expected) in unsupported.items():
        if value != expected:
            raise ValueError(f"GRPOConfig.{key}={value!r} is not supported with a polopt loss (use {expected!r})")
    if config.use_vllm and config.vllm_importance_sampling_correction:
        raise ValueError(
            "GRPOConfig.vllm_importance_sampling_correction=True is not supported with a polopt loss: "
            "set it to False (the loss's ratio is taken against TRL's recomputed old log-probs)"
        )
    probe = get_loss(name)  # unknown names raise here, listing the registered losses
    accepted = hparam_names(type(probe))
    if "kl_coef" in loss_kwargs:
        raise ValueError("pass the KL coefficient as GRPOConfig.beta (TRL loads the reference model for it), not loss_kwargs['kl_coef']")
    if config.beta != 0:
        if "kl_coef" not in accepted:
            raise ValueError(f"GRPOConfig.beta={config.beta}: loss {name!r} has no KL term; set beta=0.0")
        loss_kwargs["kl_coef"] = config.beta
    if "max_response_len" in accepted:  # L of seq-mean-token-sum-norm = the generation budget
        loss_kwargs.setdefault("max_response_len", config.max_completion_length)
    loss = get_loss(name, **loss_kwargs)
    if loss.normalizer_kind == "groups":  # InfoNCA's softmax needs each group whole in one call
        # GRPOConfig sets steps_per_generation (default: gradient_accumulation_steps) at construction.
        if config.steps_per_generation != 1 or config.per_device_train_batch_size % config.num_generations:
            raise ValueError(
                f"loss {name!r} needs whole groups in every micro-batch: set steps_per_generation=1 and "
                f"per_device_train_batch_size a multiple of num_generations={config.num_generations} (got "
                f"steps_per_generation={config.steps_per_generation}, per_device_train_batch_size="
                f"{config.per_device_train_batch_size})"
            )
    return loss


# ------------------------------------------------------------------ TRL's own loss, as the conformance kit's fn


class TRLLossFunction:
    """GRPOTrainer's loss for one GRPOConfig setting as `fn(logprobs, old_logprobs, mask, rewards, group_ids)`.

        fn = TRLLossFunction(loss_type="dr_grpo", scale_rewards="none", max_completion_length=10)
        check_policy_loss(fn, "dr_grpo", equal_group_sizes=True, max_response_len=10)

    TRL's own code runs on the kit's batch: `_generate_and_score_completions` (advantages from the
    rewards, completion and loss masks, `num_items_in_batch`) through TRL's public `rollout_func`
    hook, then `_compute_loss`. Only the model forward is replaced: `_get_per_token_logps_and_entropies`
    returns the kit's `logprobs`, and `old_per_token_logps` is the kit's `old_logprobs`. TRL's layout
    is `num_generations` consecutive rows per prompt, so every group must have the same size
    (`equal_group_sizes=True` in the kit); rows are sorted by group here and the gradient flows back
    through that permutation. An empty row (the kit draws some) is a one-token completion that
    TRL's `env_mask` (tool mask) takes out of the loss. One trainer per group size, built lazily.
    """

    def __init__(self, **config: Any) -> None:
        self.config = config
        self.trainers: dict[int, GRPOTrainer] = {}

    def __repr__(self) -> str:
        return f"TRLLossFunction({', '.join(f'{k}={v!r}' for k, v in self.config.items())})"

    def trainer(self, group_size: int) -> GRPOTrainer:
        if group_size not in self.trainers:
            self.trainers[group_size] = build_kit_trainer(group_size, self.config)
        return self.trainers[group_size]

    def __call__(self, logprobs, old_logprobs, mask, rewards, group_ids) -> torch.Tensor:
        sizes = torch.unique(group_ids, return_counts=True)[1]
        if not (sizes == sizes[0]).all():
            raise ValueError(f"TRL needs groups of one size (num_generations), got sizes {sizes.tolist()}")
        order = torch.sort(group_ids, stable=True).indices  # TRL: each group's rows consecutive
        trainer = self.trainer(int(sizes[0]))
        trainer.kit_logprobs = logprobs[order]
        lengths = mask[order].sum(dim=-1).tolist()
        trainer.kit_rollout = {
            "prompt_ids": [[trainer.prompt_token]] * len(lengths),
            "completion_ids": [[trainer.completion_token] * max(n, 1) for n in lengths],
            "logprobs": [[0.0] * max(n, 1) for n in lengths],
            "env_mask": [[1] * n if n else [0] for n in lengths],
            REWARDS: rewards[order].tolist(),
        }
        batch = trainer._generate_and_score_completions([{"prompt": "1+1="} for _ in lengths])
        batch["old_per_token_logps"] = old_logprobs[order][:, : batch["completion_ids"].size(1)]
        loss = trainer._compute_loss(trainer.model, batch)
        for metrics in trainer._metrics.values():  # TRL appends to these on every call; nothing reads them here
            metrics.clear()
        return loss


class KitGRPOTrainer(GRPOTrainer):
    """GRPOTrainer whose model forward returns the conformance kit's log-probs (everything else is TRL's)."""

    kit_logprobs: torch.Tensor
    kit_rollout: dict

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs):
        logprobs = self.kit_logprobs[:, :logits_to_keep]
        return logprobs, torch.zeros_like(logprobs.detach()), None


def kit_rollout(prompts: list, trainer: KitGRPOTrainer) -> dict:
    """TRL's `rollout_func`: the kit batch's completions (the kit's rewards ride along as an extra field)."""
    return trainer.kit_rollout


def kit_reward(completions, **kwargs) -> list[float]:
    """The kit's rewards, which `kit_rollout` passed through TRL as an extra field of each row."""
    return kwargs[REWARDS]


def build_kit_trainer(group_size: int, config: dict[str, Any]) -> KitGRPOTrainer:
    """A real GRPOTrainer (tiny in-memory model, `config` as GRPOConfig keys) with `num_generations=group_size`."""
    from datasets import Dataset

    from polopt.testing.tiny_lm import tiny_qwen2_with_tokenizer

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # rollout_func is marked experimental
    model, tokenizer = tiny_qwen2_with_tokenizer()
    args = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="polopt-trl-kit-"),
        per_device_train_batch_size=group_size,
        num_generations=group_size,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        **config,
    )
    trainer = KitGRPOTrainer(
        model=model,
        reward_funcs=kit_reward,
        args=args,
        train_dataset=Dataset.from_dict({"prompt": ["1+1="]}),
        processing_class=tokenizer,
        rollout_func=kit_rollout,
    )
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop; one call is one optimizer step
    trainer.prompt_token = tokenizer.convert_tokens_to_ids("1")
    trainer.completion_token = tokenizer.convert_tokens_to_ids("2")
    return trainer
