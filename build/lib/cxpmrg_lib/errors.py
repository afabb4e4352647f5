"""Errors the command line reports as one line (no traceback): the user can fix what they name."""
from cxpmrg_lib.data.errors import DataError

__all__ = ["DataError", "RunError", "USER_ERRORS"]


class RunError(RuntimeError):
    """A run directory that cannot serve: missing, unfinished, of another stage or of another preset."""


USER_ERRORS = (DataError, RunError, FileNotFoundError, FileExistsError)
