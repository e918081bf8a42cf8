"""Errors that mean "the user gave us something we cannot use".

The CLI turns them into exit code 2 and one line on stderr; the app shows them as a
``gr.Error``. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input: the message says what is wrong and how to fix it."""


def check(condition: bool, message: str) -> None:
    """Raise :class:`UserError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise UserError(message)
