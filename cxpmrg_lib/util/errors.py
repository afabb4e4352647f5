"""The library's error types, and those the command line reports as one line (no traceback): the
user can fix what they name."""

__all__ = ["DataError", "RunError", "USER_ERRORS"]


class DataError(ValueError):
    """Bad input data: a missing file, a malformed row, a path escaping the root, ... (raised by the data
    layer; each message names the file, row or column at fault)."""


class RunError(RuntimeError):
    """A run directory that cannot serve: missing, unfinished, of another stage or of another preset."""


USER_ERRORS = (DataError, RunError, FileNotFoundError, FileExistsError)
