"""`_component_` sections: their keys checked against the constructor, and building them.

A section holding a `_component_` (dataset, model, tokenizer, checkpointer, optimizer,
lr_scheduler, verifier, metric_logger, rollout.engine) is passed to `torchtune.config.instantiate`:
the constructor is its schema. A key it does not take is rejected by name (`check_component_keys`,
at validation); a value it rejects, an argument it lacks or a path it cannot open is a ConfigError
naming the section (`instantiate_component`, at setup).
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig
from torchtune.config._utils import _get_component_from_path

from polopt.errors import ConfigError, UserError


def component_signature(path: str) -> Optional[inspect.Signature]:
    """The signature of the constructor a `_component_` path names; None for builtins without one
    (nothing to check against). Raises what importing the path raises."""
    try:
        return inspect.signature(_get_component_from_path(path))
    except (TypeError, ValueError):
        return None


def component_parameters(path: str) -> Optional[list[str]]:
    """The names a `_component_` path's constructor takes by keyword; None if it takes **kwargs
    or has no signature to read."""
    signature = component_signature(path)
    if signature is None:
        return None
    params = list(signature.parameters.values())
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return [p.name for p in params if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]


def check_component_keys(section, where: str) -> None:
    """A `_component_` section's keys are its constructor's arguments: reject any other by name
    (unless the constructor takes **kwargs)."""
    path = section["_component_"]
    try:
        valid = component_parameters(path)
    except Exception as e:  # noqa: BLE001 - any import failure is the config's to fix
        raise ConfigError(f"config key '{where}._component_': cannot import {path!r} ({e})", f"{where}._component_") from e
    if valid is None:
        return
    for key in section:
        if key != "_component_" and key not in valid:
            raise ConfigError(
                f"unknown config key '{where}.{key}' for {path}; valid keys here: {', '.join(valid)}", f"{where}.{key}"
            )


def instantiate_component(section: DictConfig, key: str, *args: Any, **kwargs: Any) -> Any:
    """`torchtune.config.instantiate(section, *args, **kwargs)`, with what the config got wrong — an
    argument the constructor lacks or does not take, a value it rejects with ValueError, a path it
    cannot open (OSError) — raised as a ConfigError naming `key` (one line, exit status 2). A
    TypeError raised inside the constructor is a bug, not the config's: it keeps its traceback.

    A section with a `log_dir` (torchtune's metric loggers) has that folder made first: DiskLogger
    makes it in its constructor, and when that fails the half-built logger's `__del__` prints an
    "Exception ignored" traceback after the one-line error."""
    from torchtune import config

    path = section["_component_"]
    given = {k: v for k, v in section.items() if k != "_component_"}
    signature = component_signature(path)
    if signature is not None:
        try:
            signature.bind(*args, **{**given, **kwargs})
        except TypeError as e:
            missing = re.search(r"missing a required argument: '(\w+)'", str(e))
            hint = f"; set {key}.{missing.group(1)}" if missing else ""
            raise ConfigError(f"{key} ({path}): {e}{hint}", key) from e
    if given.get("log_dir") is not None:
        try:
            Path(str(given["log_dir"])).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"{key}.log_dir ({path}): cannot make {given['log_dir']}: {e}", f"{key}.log_dir") from e
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
