"""`UserError`: something the user set is wrong (a config key, a data file, a path).

The recipes print a `UserError` as one line, `error: <what> (<where>); <what to set>`, and exit with
status 2; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(ValueError):
    """Something the user set is wrong; the message says what, where, and what to set instead."""


class ConfigError(UserError):
    """A config key is unknown, missing, or has the wrong type. `key` is its dotted name."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


class DataError(UserError):
    """A prompt file or row is unusable: the message names the file and line, and the config key."""


class DataFileNotFound(DataError, FileNotFoundError):
    """A prompt file does not exist."""


class CheckpointError(ConfigError):
    """A checkpoint cannot be resumed by this run; the message says why and what to set."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint holds a pickle that is not tensors or plain data: refused, never unpickled."""
