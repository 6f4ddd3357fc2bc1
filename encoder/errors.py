"""Errors raised by the encoder package."""

from __future__ import annotations


class ModelError(Exception):
    """A model folder or checkpoint cannot be used.

    The message names the path and says what to do about it.
    """
