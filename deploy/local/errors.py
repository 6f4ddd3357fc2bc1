"""Exception types of the local stack manager.

Every error says what went wrong *and* what to do about it; the CLI prints the message as is.
"""

from __future__ import annotations


class StackError(RuntimeError):
    """Base class: anything the local stack manager cannot do."""


class JavaNotFoundError(StackError):
    """No usable Java (missing, or older than a service needs)."""


class MavenNotFoundError(StackError):
    """``mvn`` is not on PATH."""


class FetchError(StackError):
    """A download through Maven failed; the message carries the tail of mvn's output."""


class PortInUseError(StackError):
    """A port that was asked for explicitly is already taken."""


class ServiceStartError(StackError):
    """A service refused to start, died, or did not become ready in time (log tail included)."""


class StackAlreadyRunningError(StackError):
    """``up`` was called for a run dir whose recorded processes are still alive."""
