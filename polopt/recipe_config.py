"""The keys `recipes/online_rl_distributed.py` reads, their types and defaults, checked up front.

A typo in a config file or on the command line (`rollout.temprature=0.7`) is an error naming the
key and listing the valid ones, not a silently ignored setting. Sections holding a `_component_`
(model, tokenizer, checkpointer, optimizer, verifier, metric_logger, rollout.engine) are passed to
`torchtune.config.instantiate` and checked by the component's own constructor instead.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf


class ConfigError(ValueError):
    """A config key is unknown, missing, or has the wrong type."""


_NUMBER = (int, float)
_OPTIONAL_INT = (int, type(None))
_OPTIONAL_STR = (str, type(None))

# key -> (accepted types, default). `None` default with a non-None type means required.
SCHEMA: dict[str, Any] = {
    "output_dir": (str, None),
    "model_dir": (_OPTIONAL_STR, None),  # free variable for ${model_dir} interpolation in paths
    "seed": (int, 0),
    "device": (str, "cpu"),
    "dtype": (str, "fp32"),
    "max_steps": (int, None),
    "loss": (str, None),
    "loss_args": (dict, {}),
    "model": ("component", None),
    "tokenizer": ("component", None),
    "checkpointer": ("component", None),
    "optimizer": ("component", None),
    "verifier": ("component", None),
    "metric_logger": ("component", None),
    "lr_warmup_steps": (int, 0),
    "clip_grad_norm": ((int, float, type(None)), 1.0),
    "num_minibatches": (int, 1),
    "gradient_accumulation_steps": (int, 1),
    "balance_minibatch_tokens": (bool, False),
    "recompute_old_logprobs": (bool, False),
    "fused_logprobs": (bool, True),
    "logprob_chunk_size": (int, 1024),
    "enable_activation_checkpointing": (bool, False),
    "checkpoint_every_n_steps": (_OPTIONAL_INT, None),
    "keep_last_checkpoints": (int, 2),
    "resume": (bool, False),
    "max_nan_steps": (int, 3),
    "log_every_n_steps": (int, 1),
    "save_final_model": (bool, True),
    "dataset": (dict, None),
    "rollout": (dict, None),
    "filter": (dict, {}),
    "validation": (dict, {}),
    "rollout_correction": (dict, {}),
}

SECTIONS: dict[str, dict[str, Any]] = {
    "dataset": {
        "source": (str, None),
        "split": (str, "train"),
        "question_field": (str, "question"),
        "answer_field": (str, "answer"),
        "template": (str, "{question}"),
        "max_prompt_tokens": (_OPTIONAL_INT, None),
        "on_too_long": (str, "drop"),
        "shuffle": (bool, True),
    },
    "rollout": {
        "engine": ("component", None),
        "num_prompts": (int, None),
        "num_samples": (int, None),
        "temperature": (_NUMBER, 1.0),
        "top_p": (_NUMBER, 1.0),
        "top_k": (_OPTIONAL_INT, None),
        "max_new_tokens": (int, None),
    },
    "filter": {
        "enabled": (bool, True),
        "gen_batch_size": (_OPTIONAL_INT, None),
        "max_gen_batches": (int, 3),
    },
    "validation": {
        "source": (_OPTIONAL_STR, None),
        "split": (str, "test"),
        "question_field": (str, "question"),
        "answer_field": (str, "answer"),
        "template": (_OPTIONAL_STR, None),
        "every_n_steps": (int, 0),
        "k": (int, 1),
        "temperature": (_NUMBER, 1.0),
        "top_p": (_NUMBER, 1.0),
        "max_new_tokens": (_OPTIONAL_INT, None),
        "max_questions": (_OPTIONAL_INT, None),
        "batch_size": (int, 64),
    },
    # polopt.rollout.correction.RolloutCorrection, which checks the values
    "rollout_correction": {
        "enabled": (bool, False),
        "level": (str, "token"),
        "mode": (str, "truncate"),
        "cap": (_NUMBER, 3.0),
        "min_ratio": ((int, float, type(None)), None),
    },
}


def _check(value: Any, types, where: str) -> None:
    if types == "component":
        if not isinstance(value, (dict, DictConfig)) or "_component_" not in value:
            raise ConfigError(f"config key '{where}' must be a section with a '_component_' entry, got {value!r}")
        return
    if types is dict:
        if not isinstance(value, (dict, DictConfig)):
            raise ConfigError(f"config key '{where}' must be a section (mapping), got {value!r}")
        return
    # bool is an int subclass: do not accept True where a number is meant, or 1 where a bool is.
    bad_bool = isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,))
    if bad_bool or not isinstance(value, types):
        names = "/".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
        raise ConfigError(f"config key '{where}' must be {names}, got {value!r} ({type(value).__name__})")


def _validate_section(cfg: DictConfig, schema: dict[str, Any], prefix: str) -> None:
    for key in cfg.keys():
        if key not in schema:
            raise ConfigError(
                f"unknown config key '{prefix}{key}'; valid keys here: {', '.join(sorted(schema))}"
            )
    for key, (types, default) in schema.items():
        if key not in cfg or cfg[key] is None:
            if default is None and types not in (_OPTIONAL_INT, _OPTIONAL_STR) and not (
                isinstance(types, tuple) and type(None) in types
            ):
                raise ConfigError(f"missing required config key '{prefix}{key}'")
            continue
        _check(cfg[key], types, f"{prefix}{key}")


def validate_config(cfg: DictConfig) -> DictConfig:
    """Check every key against SCHEMA/SECTIONS, then fill in defaults. Returns the same cfg."""
    OmegaConf.set_struct(cfg, False)
    _validate_section(cfg, SCHEMA, "")
    for section, schema in SECTIONS.items():
        if section in cfg and cfg[section] is not None:
            _validate_section(cfg[section], schema, f"{section}.")
    for key, (_, default) in SCHEMA.items():
        if key not in cfg and default is not None:
            cfg[key] = default
    for section, schema in SECTIONS.items():
        if section not in cfg or cfg[section] is None:
            cfg[section] = {}
        for key, (_, default) in schema.items():
            if key not in cfg[section]:
                cfg[section][key] = default
    for key in ("max_steps", "num_minibatches", "gradient_accumulation_steps", "logprob_chunk_size"):
        if cfg[key] < 1:
            raise ConfigError(f"config key '{key}' must be >= 1, got {cfg[key]}")
    for key in ("num_prompts", "num_samples", "max_new_tokens"):
        if cfg.rollout[key] < 1:
            raise ConfigError(f"config key 'rollout.{key}' must be >= 1, got {cfg.rollout[key]}")
    if cfg.rollout.num_samples < 2:
        raise ConfigError("config key 'rollout.num_samples' must be >= 2: group statistics need K >= 2 answers")
    if not isinstance(cfg.loss_args, (dict, DictConfig)):
        raise ConfigError("config key 'loss_args' must map loss names to their keyword arguments")
    return cfg
