"""Error types shared across labutils; each message names the problem and the fix."""


class DataError(ValueError):
    """Bad data input: the message names the problem and how to fix it."""
