"""Errors the library raises for problems a user can fix.

The command line turns :class:`InputError` into one line on stderr and exit code 2; anything
else is a bug and keeps its traceback.
"""

__all__ = ["CancelledError", "InputError"]


class InputError(ValueError):
    """Bad user input: a missing or unreadable file, a prompt outside the image, and so on."""


class CancelledError(RuntimeError):
    """Raised inside long work when the caller asked to cancel it."""
