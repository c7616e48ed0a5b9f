"""The keys both recipes read, their types and defaults.

`key -> (accepted types, default)`; a `None` default with a type that does not admit None means
the key is required. "component" marks a section holding a `_component_`, passed to
`torchtune.config.instantiate`: its constructor is its schema (instantiate.py checks its keys
against the signature). Which values are in range is validate.py's (`MINIMUMS`, the recipes' rules).
"""

from __future__ import annotations

from typing import Any

import inspect

from omegaconf import ListConfig

from polopt.evaluation import DEFAULT_BATCH_SIZE
from polopt.prompts import DEFAULT_TEMPLATE
from polopt.rollout import SamplingParams
from polopt.rollout.sampler import DynamicSampler


def default_of(target, name: str) -> Any:
    """The default of argument `name` of `target` (a class's constructor or a function): a key that
    feeds it takes its default from there, so the value has one owner."""
    return inspect.signature(target).parameters[name].default


NUMBER = (int, float)
OPTIONAL_INT = (int, type(None))
OPTIONAL_STR = (str, type(None))
OPTIONAL_NUMBER = (int, float, type(None))
OPTIONAL_LIST = (list, ListConfig, type(None))

# recipes/online_rl_distributed.py
SCHEMA: dict[str, Any] = {
    "output_dir": (str, None),
    "model_dir": (OPTIONAL_STR, None),  # free variable for ${model_dir} interpolation in paths
    "seed": (int, 0),
    "device": (str, "cpu"),
    "dtype": (str, "fp32"),
    "num_threads": (OPTIONAL_INT, None),  # CPU: torch threads; null = this process's share of the cores
    "max_steps": (int, None),
    "loss": (str, None),
    "loss_args": (dict, {}),
    "loss_modules": (list, []),
    "model": ("component", None),
    "tokenizer": ("component", None),
    "checkpointer": ("component", None),
    "optimizer": ("component", None),
    "verifier": ("component", None),
    "metric_logger": ("component", None),
    # torchtune's cosine schedule with zero cycles is a linear warm-up from 0, then constant; the
    # recipe passes the optimizer and num_training_steps=max_steps.
    "lr_scheduler": ("component", {
        "_component_": "torchtune.training.lr_schedulers.get_cosine_schedule_with_warmup",
        "num_warmup_steps": 0,
        "num_cycles": 0.0,
    }),
    "clip_grad_norm": (OPTIONAL_NUMBER, 1.0),
    "num_minibatches": (int, 1),
    "gradient_accumulation_steps": (int, 1),
    "balance_minibatch_tokens": (bool, False),
    "recompute_old_logprobs": (bool, False),
    "fused_logprobs": (bool, True),
    "logprob_chunk_size": (int, 1024),
    "pack_sequences": (bool, False),
    "enable_activation_checkpointing": (bool, False),
    "checkpoint_every_n_steps": (OPTIONAL_INT, None),
    "keep_last_checkpoints": (int, 2),
    "resume": (bool, False),
    "resume_allow_changes": (bool, False),
    "overwrite": (bool, False),
    "max_nan_steps": (int, 3),
    "log_every_n_steps": (int, 1),
    "save_final_model": (bool, True),
    "dataset": ("component", None),  # polopt.prompts.prompt_dataset: its arguments are the keys
    "shuffle": (bool, True),
    "rollout": (dict, None),
    "filter": (dict, {}),
    "validation": (dict, {}),
    "rollout_correction": ("component", {"_component_": "polopt.rollout.correction.RolloutCorrection"}),
}

SECTIONS: dict[str, dict[str, Any]] = {
    "rollout": {
        "engine": ("component", None),
        "num_prompts": (int, None),
        "num_samples": (int, None),
        "temperature": (NUMBER, default_of(SamplingParams, "temperature")),
        "top_p": (NUMBER, default_of(SamplingParams, "top_p")),
        "top_k": (OPTIONAL_INT, default_of(SamplingParams, "top_k")),
        "max_new_tokens": (int, None),
        "max_staleness": (int, 0),
    },
    "filter": {
        "enabled": (bool, default_of(DynamicSampler, "filter_groups")),
        "gen_batch_size": (OPTIONAL_INT, None),
        "max_gen_batches": (int, default_of(DynamicSampler, "max_gen_batches")),
    },
    "validation": {
        "source": (OPTIONAL_STR, None),
        "split": (str, "test"),
        "question_field": (str, "question"),
        "answer_field": (str, "answer"),
        "template": (OPTIONAL_STR, None),
        "every_n_steps": (int, 0),
        "k": (int, 1),
        "temperature": (NUMBER, default_of(SamplingParams, "temperature")),
        "top_p": (NUMBER, default_of(SamplingParams, "top_p")),
        "max_new_tokens": (OPTIONAL_INT, None),
        "max_questions": (OPTIONAL_INT, None),
        "max_prompt_tokens": (OPTIONAL_INT, None),
        "on_too_long": (str, "drop"),
        "batch_size": (int, DEFAULT_BATCH_SIZE),
    },
}

# recipes/evaluate.py
EVAL_SCHEMA: dict[str, Any] = {
    "model_dir": (OPTIONAL_STR, None),
    "output_dir": (str, None),
    "overwrite": (bool, False),
    "seed": (int, 0),
    "device": (str, "cpu"),
    "dtype": (str, "fp32"),
    "num_threads": (OPTIONAL_INT, None),
    "datasets": (list, None),
    "template": (str, DEFAULT_TEMPLATE),
    "k": (int, 1),
    # unbiased pass@j for each j; null: 1, 4, 16, ... up to each dataset's k (validate.pass_k_for)
    "pass_k": (OPTIONAL_LIST, None),
    "temperature": (NUMBER, default_of(SamplingParams, "temperature")),
    "top_p": (NUMBER, default_of(SamplingParams, "top_p")),
    "top_k": (OPTIONAL_INT, default_of(SamplingParams, "top_k")),
    "max_new_tokens": (int, None),
    "max_prompt_tokens": (OPTIONAL_INT, None),
    "max_questions": (OPTIONAL_INT, None),
    "batch_size": (int, DEFAULT_BATCH_SIZE),
    "save_answers": (bool, False),  # answers_<dataset>.jsonl beside eval.json: every sampled answer and its reward
    "model": ("component", None),
    "tokenizer": ("component", None),
    "checkpointer": ("component", None),
    "rollout": (dict, None),
    "verifier": ("component", None),
}
EVAL_SECTIONS: dict[str, dict[str, Any]] = {"rollout": {"engine": ("component", None)}}
EVAL_DATASET_KEYS: dict[str, Any] = {
    "source": (str, None),
    "name": (OPTIONAL_STR, None),
    "split": (str, "test"),
    "question_field": (str, "question"),
    "answer_field": (str, "answer"),
    "template": (OPTIONAL_STR, None),
    "k": (OPTIONAL_INT, None),
    "max_questions": (OPTIONAL_INT, None),
}
