"""The one error type for mistakes a user can make (bad flag, bad argument, bad data row).

The CLI prints it as one line and exits 2; library callers can catch it as a ValueError.
"""


class GKDError(ValueError):
    """A user-facing error whose message says what is wrong, where, and how to fix it."""
