"""One config section against its schema (schema.py): unknown keys, types, required keys, defaults,
and lower bounds; each failure a ConfigError naming the dotted key.

A typo in a config file or on the command line (`rollout.temprature=0.7`, `max_new_token=8`) is an
error naming the key and listing the valid ones, not a silently ignored setting.
"""

from __future__ import annotations

from typing import Any, Optional

from omegaconf import DictConfig, ListConfig, OmegaConf

from polopt.config.instantiate import check_component_keys
from polopt.errors import ConfigError


def _admits_none(types) -> bool:
    return isinstance(types, tuple) and type(None) in types


def check_value(value: Any, types, where: str) -> None:
    """`value` of config key `where` is of `types` (a schema entry's first element)."""
    if types == "component":
        if not isinstance(value, (dict, DictConfig)) or "_component_" not in value:
            raise ConfigError(f"config key '{where}' must be a section with a '_component_' entry, got {value!r}", where)
        check_component_keys(value, where)
        return
    if types is dict:
        if not isinstance(value, (dict, DictConfig)):
            raise ConfigError(f"config key '{where}' must be a section (mapping), got {value!r}", where)
        return
    if types is list or (isinstance(types, tuple) and list in types):
        if not isinstance(value, (list, ListConfig)):
            raise ConfigError(f"config key '{where}' must be a list, e.g. {where}=[a,b], got {value!r}", where)
        return
    # bool is an int subclass: do not accept True where a number is meant, or 1 where a bool is.
    bad_bool = isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,))
    if bad_bool or not isinstance(value, types):
        names = "/".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
        raise ConfigError(f"config key '{where}' must be {names}, got {value!r} ({type(value).__name__})", where)


def check_section(cfg: DictConfig, schema: dict[str, Any], prefix: str) -> None:
    """Every key of `cfg` is in `schema`, every required key is there, every value has its type.
    `prefix` is the section's dotted path with a trailing dot ("" at the top level)."""
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
            if default is None and not _admits_none(types):
                raise ConfigError(f"missing required config key '{prefix}{key}'", f"{prefix}{key}")
            continue
        check_value(cfg[key], types, f"{prefix}{key}")


def fill_defaults(cfg: DictConfig, schema: dict[str, Any]) -> None:
    """Set each key of `schema` that `cfg` lacks to its default (required keys are there already)."""
    for key, (_, default) in schema.items():
        if key not in cfg:
            cfg[key] = default


def check_sections(cfg: DictConfig, schema: dict[str, Any], sections: dict[str, dict[str, Any]]) -> None:
    """A recipe's whole config: the top level against `schema`, each of `sections` against its own
    schema; then every default filled in."""
    OmegaConf.set_struct(cfg, False)
    check_section(cfg, schema, "")
    for section, section_schema in sections.items():
        if section in cfg and cfg[section] is not None:
            check_section(cfg[section], section_schema, f"{section}.")
    fill_defaults(cfg, schema)
    for section, section_schema in sections.items():
        if section not in cfg or cfg[section] is None:
            cfg[section] = {}
        fill_defaults(cfg[section], section_schema)


def at_least(value: Optional[int], low: int, key: str) -> None:
    """`value` of `key` is >= `low` (None, an unset optional key, passes)."""
    if value is not None and value < low:
        raise ConfigError(f"config key '{key}' must be >= {low}, got {value}", key)
