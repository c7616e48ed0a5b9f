"""The keys both recipes read, their types and defaults, checked up front.

`validate_config` (recipes/online_rl_distributed.py) and `validate_eval_config`
(recipes/evaluate.py): a typo in a config file or on the command line (`rollout.temprature=0.7`,
`loss_args.nfft.epsilon=0.5`, `max_new_token=8`) is an error naming the key and listing the valid
ones, not a silently ignored setting. Sections holding a `_component_` (dataset, model,
tokenizer, checkpointer, optimizer, lr_scheduler, verifier, metric_logger, rollout.engine) are
passed to `torchtune.config.instantiate`: the constructor is their schema (a key it does not take is
rejected here, by name; values are checked by the constructor itself).

User errors, config or data, are `UserError`s: the recipes print them as one line (`error: ...`,
with the config file and line of the key when it is in the file) and exit with status 2; anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import re
import sys
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, ListConfig, OmegaConf
from torchtune.config._utils import _get_component_from_path

from polopt.errors import ConfigError, UserError  # noqa: F401 - re-exported: the recipes raise ConfigError
from polopt.prompts import DEFAULT_TEMPLATE, TOO_LONG_POLICIES


_NUMBER = (int, float)
_OPTIONAL_INT = (int, type(None))
_OPTIONAL_STR = (str, type(None))
_OPTIONAL_NUMBER = (int, float, type(None))

# key -> (accepted types, default). `None` default with a non-None type means required.
SCHEMA: dict[str, Any] = {
    "output_dir": (str, None),
    "model_dir": (_OPTIONAL_STR, None),  # free variable for ${model_dir} interpolation in paths
    "seed": (int, 0),
    "device": (str, "cpu"),
    "dtype": (str, "fp32"),
    "num_threads": (_OPTIONAL_INT, None),  # CPU: torch threads; null = this process's share of the cores
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
    "clip_grad_norm": (_OPTIONAL_NUMBER, 1.0),
    "num_minibatches": (int, 1),
    "gradient_accumulation_steps": (int, 1),
    "balance_minibatch_tokens": (bool, False),
    "recompute_old_logprobs": (bool, False),
    "fused_logprobs": (bool, True),
    "logprob_chunk_size": (int, 1024),
    "pack_sequences": (bool, False),
    "enable_activation_checkpointing": (bool, False),
    "checkpoint_every_n_steps": (_OPTIONAL_INT, None),
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
        "max_prompt_tokens": (_OPTIONAL_INT, None),
        "on_too_long": (str, "drop"),
        "batch_size": (int, 64),
    },
}

# recipes/evaluate.py
EVAL_SCHEMA: dict[str, Any] = {
    "model_dir": (_OPTIONAL_STR, None),
    "output_dir": (str, None),
    "overwrite": (bool, False),
    "seed": (int, 0),
    "device": (str, "cpu"),
    "dtype": (str, "fp32"),
    "num_threads": (_OPTIONAL_INT, None),
    "datasets": (list, None),
    "template": (str, DEFAULT_TEMPLATE),
    "k": (int, 1),
    "pass_k": (list, []),  # unbiased pass@j for each j (recipes/evaluate.py)
    "temperature": (_NUMBER, 1.0),
    "top_p": (_NUMBER, 1.0),
    "top_k": (_OPTIONAL_INT, None),
    "max_new_tokens": (int, None),
    "max_prompt_tokens": (_OPTIONAL_INT, None),
    "max_questions": (_OPTIONAL_INT, None),
    "batch_size": (int, 64),
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
    "name": (_OPTIONAL_STR, None),
    "split": (str, "test"),
    "question_field": (str, "question"),
    "answer_field": (str, "answer"),
    "template": (_OPTIONAL_STR, None),
    "k": (_OPTIONAL_INT, None),
    "max_questions": (_OPTIONAL_INT, None),
}


def _check(value: Any, types, where: str) -> None:
    if types == "component":
        if not isinstance(value, (dict, DictConfig)) or "_component_" not in value:
            raise ConfigError(f"config key '{where}' must be a section with a '_component_' entry, got {value!r}", where)
        _check_component_keys(value, where)
        return
    if types is dict:
        if not isinstance(value, (dict, DictConfig)):
            raise ConfigError(f"config key '{where}' must be a section (mapping), got {value!r}", where)
        return
    if types is list:
        if not isinstance(value, (list, ListConfig)):
            raise ConfigError(f"config key '{where}' must be a list, e.g. {where}=[a,b], got {value!r}", where)
        return
    # bool is an int subclass: do not accept True where a number is meant, or 1 where a bool is.
    bad_bool = isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,))
    if bad_bool or not isinstance(value, types):
        names = "/".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
        raise ConfigError(f"config key '{where}' must be {names}, got {value!r} ({type(value).__name__})", where)


def _signature(target: Any) -> Optional[inspect.Signature]:
    """A component's signature; None for builtins without one (nothing to check against)."""
    try:
        return inspect.signature(target)
    except (TypeError, ValueError):
        return None


def instantiate_component(section: DictConfig, key: str, *args: Any, **kwargs: Any) -> Any:
    """`torchtune.config.instantiate(section, *args, **kwargs)`, with what the config got wrong — an
    argument the constructor lacks or does not take, a value it rejects with ValueError, a path it
    cannot open (OSError) — raised as a ConfigError naming `key` (one line, exit status 2). A
    TypeError raised inside the constructor is a bug, not the config's: it keeps its traceback."""
    from torchtune import config

    path = section["_component_"]
    given = {k: v for k, v in section.items() if k != "_component_"}
    signature = _signature(_get_component_from_path(path))
    if signature is not None:
        try:
            signature.bind(*args, **{**given, **kwargs})
        except TypeError as e:
            missing = re.search(r"missing a required argument: '(\w+)'", str(e))
            hint = f"; set {key}.{missing.group(1)}" if missing else ""
            raise ConfigError(f"{key} ({path}): {e}{hint}", key) from e
    try:
        return config.instantiate(section, *args, **kwargs)
    except UserError:
        raise
    except (ValueError, OSError) as e:  # OSError: a path in the section (tokenizer files, a log dir)
        raise ConfigError(f"{key} ({path}): {e}", key) from e


def sampling_params(prefix: str, **fields: Any):
    """`polopt.rollout.SamplingParams(**fields)`, a rejected field raised as a ConfigError naming
    its config key `<prefix><field>` (`rollout.temperature`; prefix "" for top-level keys)."""
    from polopt.rollout import InvalidSamplingParam, SamplingParams

    try:
        return SamplingParams(**fields)
    except InvalidSamplingParam as e:
        raise ConfigError(f"{prefix}{e.field} {e.problem}", f"{prefix}{e.field}") from e


def _check_component_keys(section, where: str) -> None:
    """A `_component_` section's keys are its constructor's arguments: reject any other by name
    (unless the constructor takes **kwargs)."""
    path = section["_component_"]
    try:
        target = _get_component_from_path(path)
    except Exception as e:  # noqa: BLE001 - any import failure is the config's to fix
        raise ConfigError(f"config key '{where}._component_': cannot import {path!r} ({e})", f"{where}._component_") from e
    signature = _signature(target)
    if signature is None:
        return
    params = list(signature.parameters.values())
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return
    valid = [p.name for p in params if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]
    for key in section:
        if key != "_component_" and key not in valid:
            raise ConfigError(
                f"unknown config key '{where}.{key}' for {path}; valid keys here: {', '.join(valid)}", f"{where}.{key}"
            )


def _validate_section(cfg: DictConfig, schema: dict[str, Any], prefix: str) -> None:
    for key in cfg.keys():
        if key not in schema:
            raise ConfigError(
                f"unknown config key '{prefix}{key}'; valid keys here: {', '.join(sorted(schema))}", f"{prefix}{key}"
            )
    for key, (types, default) in schema.items():
        if types == "component" and isinstance(default, dict) and isinstance(cfg.get(key), (dict, DictConfig)) \
                and "_component_" not in cfg[key]:
            # `lr_scheduler.num_warmup_steps=5` on a config without the section: the default component
            cfg[key]["_component_"] = default["_component_"]
        if key not in cfg or cfg[key] is None:
            if default is None and types not in (_OPTIONAL_INT, _OPTIONAL_STR) and not (
                isinstance(types, tuple) and type(None) in types
            ):
                raise ConfigError(f"missing required config key '{prefix}{key}'", f"{prefix}{key}")
            continue
        _check(cfg[key], types, f"{prefix}{key}")


def _fill_defaults(cfg: DictConfig, schema: dict[str, Any], sections: dict[str, dict[str, Any]]) -> None:
    for key, (_, default) in schema.items():
        if key not in cfg:  # required keys are present: _validate_section checked
            cfg[key] = default
    for section, section_schema in sections.items():
        if section not in cfg or cfg[section] is None:
            cfg[section] = {}
        for key, (_, default) in section_schema.items():
            if key not in cfg[section]:
                cfg[section][key] = default


def _check_sections(cfg: DictConfig, schema: dict[str, Any], sections: dict[str, dict[str, Any]]) -> None:
    OmegaConf.set_struct(cfg, False)
    _validate_section(cfg, schema, "")
    for section, section_schema in sections.items():
        if section in cfg and cfg[section] is not None:
            _validate_section(cfg[section], section_schema, f"{section}.")
    _fill_defaults(cfg, schema, sections)


def _at_least(value: int, low: int, key: str) -> None:
    if value < low:
        raise ConfigError(f"config key '{key}' must be >= {low}, got {value}", key)


def validate_config(cfg: DictConfig) -> DictConfig:
    """Check every key against SCHEMA/SECTIONS and `loss_args` against the loss registry (after
    importing `loss_modules`), then fill in defaults. Returns the same cfg."""
    _check_sections(cfg, SCHEMA, SECTIONS)
    for key in ("max_steps", "num_minibatches", "gradient_accumulation_steps", "logprob_chunk_size"):
        _at_least(cfg[key], 1, key)
    for key in ("num_prompts", "num_samples", "max_new_tokens"):
        _at_least(cfg.rollout[key], 1, f"rollout.{key}")
    if cfg.rollout.num_samples < 2:
        raise ConfigError("config key 'rollout.num_samples' must be >= 2: group statistics need K >= 2 answers",
                          "rollout.num_samples")
    for section in ("dataset", "validation"):
        on_too_long = cfg[section].get("on_too_long", "drop")
        if on_too_long not in TOO_LONG_POLICIES:
            raise ConfigError(f"config key '{section}.on_too_long' must be one of {', '.join(TOO_LONG_POLICIES)}, "
                              f"got {on_too_long!r}", f"{section}.on_too_long")
    import_loss_modules(cfg.loss_modules)
    _check_loss_args(cfg)
    return cfg


def import_loss_modules(modules) -> None:
    """Import each entry of `loss_modules` (a module name, or a path to a .py file) so that the
    `@register_loss` classes it defines are in the registry. The working directory is importable,
    as it is for `python -m`."""
    if str(Path.cwd()) not in sys.path and "" not in sys.path:
        sys.path.append(str(Path.cwd()))
    for i, name in enumerate(modules):
        where = f"loss_modules[{i}]"
        if not isinstance(name, str):
            raise ConfigError(f"config key '{where}' must be a module name or a .py path, got {name!r}", "loss_modules")
        try:
            if name.endswith(".py"):
                path = Path(name).expanduser()
                if not path.is_file():
                    raise ConfigError(f"config key '{where}': no such file {name} (resolved: {path.resolve()})", "loss_modules")
                spec = importlib.util.spec_from_file_location(path.stem, path)
                module = importlib.util.module_from_spec(spec)
                sys.modules[path.stem] = module
                spec.loader.exec_module(module)
            else:
                importlib.import_module(name)
        except ModuleNotFoundError as e:
            raise ConfigError(
                f"config key '{where}': cannot import {name!r} ({e}); put its folder on PYTHONPATH, "
                "run from the folder that holds it, or give a path to the .py file", "loss_modules"
            ) from e


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
    """recipes/evaluate.py's counterpart of `validate_config`; each `datasets` entry becomes a mapping."""
    _check_sections(cfg, EVAL_SCHEMA, EVAL_SECTIONS)
    _at_least(cfg.k, 1, "k")
    _at_least(cfg.max_new_tokens, 1, "max_new_tokens")
    if not cfg.datasets:
        raise ConfigError("config key 'datasets' is empty: give at least one dataset path", "datasets")
    entries = []
    for i, item in enumerate(cfg.datasets):
        entry = OmegaConf.create({"source": item}) if isinstance(item, str) else item
        if not isinstance(entry, DictConfig):
            raise ConfigError(f"config key 'datasets[{i}]' must be a path or a mapping with 'source', got {item!r}",
                              "datasets")
        OmegaConf.set_struct(entry, False)
        _validate_section(entry, EVAL_DATASET_KEYS, f"datasets[{i}].")
        for key, (_, default) in EVAL_DATASET_KEYS.items():
            if key not in entry:
                entry[key] = default
        if entry.k is not None:
            _at_least(entry.k, 1, f"datasets[{i}].k")
        entries.append(entry)
    cfg.datasets = entries
    cfg.pass_k = _checked_pass_k(cfg)
    return cfg


def _checked_pass_k(cfg: DictConfig) -> list[int]:
    """`pass_k` as a sorted list of distinct ints, each >= 1 and <= every dataset's k (samples per
    question: pass@j needs j samples); a ConfigError naming the key otherwise."""
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
                              f"answers per question; each pass_k entry must be <= k: raise k or drop "
                              f"{', '.join(map(str, too_big))} from pass_k", "pass_k")
    return sorted(set(items))


def locate_key(config_path: str | Path, dotted: str) -> Optional[int]:
    """The 1-based line of `dotted` (e.g. `rollout.temperature`) in a YAML file, if it is written
    there as nested block mappings or a `{flow: mapping}`; None if not found (e.g. a command-line key)."""
    try:
        lines = Path(config_path).read_text().splitlines()
    except OSError:
        return None
    parts = re.sub(r"\[\d+\]", "", dotted).split(".")
    stack: list[tuple[int, str]] = []  # (indent, key) of the enclosing block mappings
    for lineno, line in enumerate(lines, start=1):
        m = re.match(r"^(\s*)([A-Za-z0-9_.\-]+)\s*:(.*)$", line)
        if not m or line.lstrip().startswith("#"):
            continue
        indent, key, rest = len(m.group(1)), m.group(2), m.group(3)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = [k for _, k in stack] + [key]
        if path == parts[: len(path)]:
            remaining = parts[len(path):]
            if not remaining or any(re.search(rf"[{{,]\s*{re.escape(r)}\s*:", rest) for r in remaining[-1:]):
                return lineno
        stack.append((indent, key))
    return None


# What a run *is*: `resume=true` refuses to continue a run with other values for these (unless
# `resume_allow_changes=true`). max_steps, logging, checkpointing, validation and the engine may change.
RESUME_FIXED_KEYS = (
    "loss",
    "loss_args.<loss>",
    "seed",
    "model",
    "optimizer",
    "dataset",
    "shuffle",
    "rollout.num_prompts",
    "rollout.num_samples",
    "rollout.temperature",
    "rollout.top_p",
    "rollout.top_k",
    "rollout.max_new_tokens",
    "filter",
    "num_minibatches",
    "recompute_old_logprobs",
)


def resume_config_changes(saved_path: str | Path, new: DictConfig) -> list[str]:
    """`"key: old -> new"` for each RESUME_FIXED_KEYS entry on which the run config saved at
    `saved_path` and the (validated) `new` config differ."""
    saved = OmegaConf.load(saved_path)
    new_resolved = OmegaConf.create(OmegaConf.to_container(new, resolve=True))
    changes = []
    for key in RESUME_FIXED_KEYS:
        key = key.replace("<loss>", str(saved.get("loss")))
        before, after = OmegaConf.select(saved, key), OmegaConf.select(new_resolved, key)
        if key.startswith("loss_args.") and saved.get("loss") == new_resolved.get("loss"):
            # the loss's hyperparameters as built, defaults included: `{}` and the defaults spelt out agree
            before, after = _loss_hparams(saved.loss, before), _loss_hparams(saved.loss, after)
            if isinstance(before, dict) and isinstance(after, dict):  # name only what changed
                changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
                before, after = ({k: d.get(k) for k in changed} for d in (before, after))
        if before != after:
            changes.append(f"{key}: {_plain(before)} -> {_plain(after)}")
    return changes


def _loss_hparams(loss: str, section: Any) -> Any:
    """{hyperparameter: value} of `loss` built from a `loss_args` section (the section itself if the
    loss cannot be built here, e.g. a module of the saved run that is not imported)."""
    from polopt.losses import get_loss, loss_hparams

    kwargs = _plain(section) or {}
    try:
        built = get_loss(loss, **kwargs)
    except (KeyError, ValueError, TypeError):
        return section
    return {name: _plain(getattr(built, name, None)) for name in sorted(loss_hparams(loss))}


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value


def describe_user_error(error: Exception, argv: list[str]) -> str:
    """`error: <config file>:<line>: <message>` for a key written in the config file, else
    `error: <message>`; always one line."""
    message = " ".join(str(error).split())
    key = getattr(error, "key", None)
    config_path = argv[argv.index("--config") + 1] if "--config" in argv[:-1] else None
    # A key set on the command line (or one of its sub-keys: `verifier.timeout_s=-1` for key `verifier`)
    # has no line in the file to point at.
    on_command_line = key and any(arg.split("=", 1)[0] == key or arg.split("=", 1)[0].startswith(f"{key}.") for arg in argv)
    if key and config_path and not on_command_line:
        line = locate_key(config_path, key)
        if line is not None:
            return f"error: {config_path}:{line}: {message}"
    return f"error: {message}"
