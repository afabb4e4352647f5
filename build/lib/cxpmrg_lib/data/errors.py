"""Errors raised by the data layer; each message names the file, row or column at fault."""


class DataError(ValueError):
    """Bad input data: a missing file, a malformed row, a path escaping the root, ..."""
