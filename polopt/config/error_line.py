"""The one line a user error prints: `error: <config file>:<line>: <message>` when its key is
written in the config file, else `error: <message>`.

User errors, config or data, are `UserError`s (polopt/errors.py): the recipes print them with
`describe_user_error` and exit with status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional


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
