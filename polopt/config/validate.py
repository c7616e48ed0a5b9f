"""`validate_config` (recipes/online_rl_distributed.py) and `validate_eval_config`
(recipes/evaluate.py): every key against the schema (schema.py, checks.py), then the recipes' own
rules — lower bounds of counts, `loss_args` against the loss registry, `pass_k` against `k`, and
the defaults one key takes from another. Each failure is a one-line ConfigError naming the key.
"""

from __future__ import annotations

from typing import Optional

from omegaconf import DictConfig, OmegaConf

from polopt.config.checks import at_least, check_section, check_sections
from polopt.config.instantiate import component_signature
from polopt.config.loss_modules import import_loss_modules
from polopt.config.schema import EVAL_DATASET_KEYS, EVAL_SCHEMA, EVAL_SECTIONS, SCHEMA, SECTIONS
from polopt.errors import ConfigError
from polopt.prompts import TOO_LONG_POLICIES

# The least value of each count (an optional key left null is not checked). 0 where it means
# "never" or "all": checkpoint_every_n_steps (no periodic checkpoint), keep_last_checkpoints (keep
# every checkpoint), max_nan_steps (stop at the first non-finite loss), validation.every_n_steps
# (validate before and after training only), lr_scheduler.num_warmup_steps (no warm-up).
MINIMUMS: dict[str, int] = {
    "max_steps": 1,
    "num_threads": 1,
    "num_minibatches": 1,
    "gradient_accumulation_steps": 1,
    "logprob_chunk_size": 1,
    "checkpoint_every_n_steps": 0,
    "keep_last_checkpoints": 0,
    "max_nan_steps": 0,
    "log_every_n_steps": 1,
    "rollout.num_prompts": 1,
    "rollout.num_samples": 2,  # group statistics need K >= 2 answers (below)
    "rollout.max_new_tokens": 1,
    "filter.gen_batch_size": 1,
    "filter.max_gen_batches": 1,
    "validation.every_n_steps": 0,
    "validation.k": 1,
    "validation.max_new_tokens": 1,
    "validation.max_questions": 1,
    "validation.max_prompt_tokens": 1,
    "validation.batch_size": 1,
    "lr_scheduler.num_warmup_steps": 0,
}
EVAL_MINIMUMS: dict[str, int] = {
    "num_threads": 1,
    "k": 1,
    "max_new_tokens": 1,
    "max_prompt_tokens": 1,
    "max_questions": 1,
    "batch_size": 1,
}
EVAL_DATASET_MINIMUMS: dict[str, int] = {"k": 1, "max_questions": 1}


def _check_minimums(cfg: DictConfig, minimums: dict[str, int], prefix: str = "") -> None:
    for key, low in minimums.items():
        value = OmegaConf.select(cfg, key, default=None)
        if key == "rollout.num_samples" and isinstance(value, int) and value < low:
            raise ConfigError("config key 'rollout.num_samples' must be >= 2: group statistics need K >= 2 answers",
                              "rollout.num_samples")
        if isinstance(value, int) and not isinstance(value, bool):  # a component's own keys are not typed here
            at_least(value, low, f"{prefix}{key}")


def validate_config(cfg: DictConfig) -> DictConfig:
    """Check every key against SCHEMA/SECTIONS and `loss_args` against the loss registry (after
    importing `loss_modules`), then fill in defaults. Returns the same cfg."""
    check_sections(cfg, SCHEMA, SECTIONS)
    _check_minimums(cfg, MINIMUMS)
    if cfg.clip_grad_norm is not None and cfg.clip_grad_norm <= 0:
        raise ConfigError(f"config key 'clip_grad_norm' must be > 0 (or null: no clipping), got {cfg.clip_grad_norm}",
                          "clip_grad_norm")
    for section in ("dataset", "validation"):
        on_too_long = cfg[section].get("on_too_long", "drop")
        if on_too_long not in TOO_LONG_POLICIES:
            raise ConfigError(f"config key '{section}.on_too_long' must be one of {', '.join(TOO_LONG_POLICIES)}, "
                              f"got {on_too_long!r}", f"{section}.on_too_long")
    import_loss_modules(cfg.loss_modules)
    _check_loss_args(cfg)
    return cfg


def _check_loss_args(cfg: DictConfig) -> None:
    from polopt.losses import list_losses, loss_hparams

    hint = "; a loss of your own: decorate it with @register_loss(name) and list its module in loss_modules"
    if cfg.loss not in list_losses():
        raise ConfigError(f"unknown loss={cfg.loss!r}; registered losses: {', '.join(list_losses())}{hint}", "loss")
    for name, section in cfg.loss_args.items():
        if name not in list_losses():
            raise ConfigError(
                f"unknown config key 'loss_args.{name}': {name!r} is not a registered loss "
                f"({', '.join(list_losses())}){hint}", f"loss_args.{name}"
            )
        if section is None:
            continue
        if not isinstance(section, (dict, DictConfig)):
            raise ConfigError(f"config key 'loss_args.{name}' must map {name}'s hyperparameters to values, got {section!r}",
                              f"loss_args.{name}")
        accepted = loss_hparams(name)
        for key in section:
            if key not in accepted:
                raise ConfigError(
                    f"unknown config key 'loss_args.{name}.{key}'; {name} accepts: {', '.join(accepted)}",
                    f"loss_args.{name}.{key}",
                )


def validate_eval_config(cfg: DictConfig) -> DictConfig:
    """recipes/evaluate.py's counterpart of `validate_config`; each `datasets` entry becomes a
    mapping, and an engine that loads its own model (vLLM's `model_name_or_path`) loads `model_dir`
    unless the config names another."""
    check_sections(cfg, EVAL_SCHEMA, EVAL_SECTIONS)
    _check_minimums(cfg, EVAL_MINIMUMS)
    if not cfg.datasets:
        raise ConfigError("config key 'datasets' is empty: give at least one dataset path", "datasets")
    entries = []
    for i, item in enumerate(cfg.datasets):
        entry = OmegaConf.create({"source": item}) if isinstance(item, str) else item
        if not isinstance(entry, DictConfig):
            raise ConfigError(f"config key 'datasets[{i}]' must be a path or a mapping with 'source', got {item!r}",
                              "datasets")
        OmegaConf.set_struct(entry, False)
        check_section(entry, EVAL_DATASET_KEYS, f"datasets[{i}].")
        for key, (_, default) in EVAL_DATASET_KEYS.items():
            if key not in entry:
                entry[key] = default
        _check_minimums(entry, EVAL_DATASET_MINIMUMS, f"datasets[{i}].")
        entries.append(entry)
    cfg.datasets = entries
    cfg.pass_k = _checked_pass_k(cfg)
    engine = cfg.rollout.engine
    signature = component_signature(engine._component_)
    if cfg.model_dir is not None and "model_name_or_path" not in engine and signature is not None \
            and "model_name_or_path" in signature.parameters:
        engine.model_name_or_path = cfg.model_dir
    return cfg


def pass_k_for(pass_k: Optional[list[int]], k: int) -> list[int]:
    """The j of the unbiased pass@j reported for a dataset sampled `k` times: `pass_k` as the config
    sets it (each j <= k: `validate_eval_config` refuses more), or, with `pass_k: null` (the
    default), 1, 4, 16, 64, ... up to k."""
    if pass_k is not None:
        return list(pass_k)
    return [4**i for i in range(k.bit_length()) if 4**i <= k]


def _checked_pass_k(cfg: DictConfig) -> Optional[list[int]]:
    """`pass_k` as a sorted list of distinct ints, each >= 1 and <= every dataset's k (samples per
    question: pass@j needs j samples); None when unset (`pass_k_for`'s default); a ConfigError
    naming the key otherwise."""
    if cfg.pass_k is None:
        return None
    items = list(cfg.pass_k)
    if any(isinstance(j, bool) or not isinstance(j, int) or j < 1 for j in items):
        raise ConfigError(f"config key 'pass_k' must be a list of integers >= 1 (e.g. [1, 4, 16]), got {items!r}",
                          "pass_k")
    for i, entry in enumerate(cfg.datasets):
        samples = int(entry.k or cfg.k)
        too_big = [j for j in items if j > samples]
        if too_big:
            where = f"datasets[{i}] ({entry.name or entry.source})"
            raise ConfigError(f"config key 'pass_k' asks for pass@{max(too_big)} but {where} samples k={samples} "
                              f"answers per question; each pass_k entry must be <= k: raise k, drop "
                              f"{', '.join(map(str, too_big))} from pass_k, or leave pass_k unset (null: "
                              f"1, 4, 16, ... up to k)", "pass_k")
    return sorted(set(items))
