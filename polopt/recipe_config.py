"""The names the recipes import from their config modules, under one import path.

Each is defined in polopt/config/ (its `__init__` lists the modules); new code imports from there.
`ConfigError` and `UserError` are polopt.errors'.
"""

from polopt.config.error_line import describe_user_error, locate_key
from polopt.config.instantiate import instantiate_component, sampling_params
from polopt.config.loss_modules import import_loss_modules
from polopt.config.resume import RESUME_FIXED_KEYS, resume_config_changes
from polopt.config.schema import EVAL_DATASET_KEYS, EVAL_SCHEMA, EVAL_SECTIONS, SCHEMA, SECTIONS
from polopt.config.validate import pass_k_for, validate_config, validate_eval_config
from polopt.errors import ConfigError, UserError

__all__ = [
    "EVAL_DATASET_KEYS",
    "EVAL_SCHEMA",
    "EVAL_SECTIONS",
    "RESUME_FIXED_KEYS",
    "SCHEMA",
    "SECTIONS",
    "ConfigError",
    "UserError",
    "describe_user_error",
    "import_loss_modules",
    "instantiate_component",
    "locate_key",
    "pass_k_for",
    "resume_config_changes",
    "sampling_params",
    "validate_config",
    "validate_eval_config",
]
