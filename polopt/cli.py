"""`polopt`: polopt's recipes through `tune run`, without `PYTHONPATH=.`.

    polopt train --config tiny_arith [key=value ...]              # recipes/online_rl_distributed.py
    polopt train --nproc_per_node 2 --config tiny_arith loss=grpo  # launcher flags before --config
    polopt evaluate --config evaluate model_dir=outputs/tiny_arith_nft/final
    polopt run [launcher flags] recipes/<recipe>.py --config ...  # any recipe, as `tune run` takes it

`--config NAME` is a path, or a name in the checkout's configs/ (`tiny_arith` = configs/tiny_arith.yaml).
Paths inside the configs (assets/, assets/data/) are relative to the directory you run from:
run from the checkout's root.

Why a wrapper: torchtune 0.6.1's wheel installs a top-level `recipes` package that comes before
the current directory on `sys.path` and raises on import, so `tune run recipes/x.py` needs
`PYTHONPATH=.`; and `tune run` turns the recipe path into a module name, so an absolute path
fails ("Relative module names not supported"). This puts the checkout first on `sys.path` (and on
PYTHONPATH, for the processes torchrun starts) and hands `tune run` the relative recipe path.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional, Sequence

RECIPES = {"train": "recipes/online_rl_distributed.py", "evaluate": "recipes/evaluate.py"}


def checkout_root() -> Path:
    """The folder holding polopt/, recipes/ and configs/ (polopt is installed editable from it)."""
    root = Path(__file__).resolve().parent.parent
    if not (root / "recipes").is_dir():
        raise SystemExit(
            f"error: no recipes/ beside the polopt package ({root}); install polopt from a clone with "
            "`pip install -e .` so that its recipes and configs come with it"
        )
    return root


def tune_argv(argv: Sequence[str], root: Path) -> list[str]:
    """`polopt <command> ...` as the arguments of `tune run`."""
    command, rest = argv[0], list(argv[1:])
    if command in RECIPES:
        split = rest.index("--config") if "--config" in rest else len(rest)
        rest = [*rest[:split], RECIPES[command], *rest[split:]]
    elif command != "run":
        raise SystemExit(f"error: unknown command {command!r}; use one of: {', '.join(RECIPES)}, run")
    for i, arg in enumerate(rest):
        if arg.endswith(".py") and Path(arg).resolve().parent == root / "recipes":
            rest[i] = f"recipes/{Path(arg).name}"  # tune run needs a relative path (a module name)
        elif i > 0 and rest[i - 1] == "--config":
            rest[i] = _resolve_config(arg, root)
    return ["run", *rest]


def _resolve_config(name: str, root: Path) -> str:
    if Path(name).is_file():
        return name
    for candidate in (root / "configs" / name, root / "configs" / f"{name}.yaml"):
        if candidate.is_file():
            return str(candidate)
    known = ", ".join(sorted(p.stem for p in (root / "configs").glob("*.yaml")))
    raise SystemExit(f"error: --config {name}: no such file, nor a config in {root / 'configs'} ({known})")


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    root = checkout_root()
    args = tune_argv(argv, root)
    sys.path.insert(0, str(root))
    for name in [m for m in sys.modules if m == "recipes" or m.startswith("recipes.")]:
        del sys.modules[name]  # torchtune's own `recipes`, if something imported it already
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH")) if p)
    from torchtune._cli.tune import main as tune_main

    sys.argv = ["tune", *args]
    tune_main()
    return 0


if __name__ == "__main__":
    sys.exit(main())
