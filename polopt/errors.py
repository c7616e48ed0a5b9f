"""`UserError`: something the user set is wrong (a config key, a data file, a path).

The recipes print a `UserError` as one line, `error: <what> (<where>); <what to set>`, and exit with
status 2; any other exception is a bug and keeps its traceback.
"""


class UserError(ValueError):
    """Something the user set is wrong; the message says what, where, and what to set instead."""


class DataError(UserError):
    """A prompt file or row is unusable: the message names the file and line, and the config key."""


class DataFileNotFound(DataError, FileNotFoundError):
    """A prompt file does not exist."""
