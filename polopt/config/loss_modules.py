"""`loss_modules`: the modules a config names so that the losses they register can be used."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

from polopt.errors import ConfigError


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
