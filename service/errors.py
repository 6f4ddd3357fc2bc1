"""Errors the service reports to its user instead of a traceback."""

from __future__ import annotations


class StartupError(RuntimeError):
    """The service cannot start; the message says which setting to check."""
