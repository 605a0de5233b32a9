"""Exceptions fastedit raises for problems the caller can act on.

Every message says what was wrong and what to do about it. The CLI prints these without a
traceback; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations


class FastEditError(Exception):
    """Base class of every user-facing fastedit error."""


class InputError(FastEditError, ValueError):
    """A bad argument, tensor, request or file: the message names it and says what to do."""


class NotPositiveDefiniteError(FastEditError, ArithmeticError):
    """A matrix that must be symmetric positive definite is not.

    Attributes:
        index: position in the leading batch dimensions of the first failing matrix.
        layer: the model layer it belongs to, when the caller knows it.
        min_pivot: the smallest Cholesky pivot seen (<= 0 or NaN for a failed matrix).
    """

    def __init__(self, message: str, *, index=None, layer=None, min_pivot=None):
        super().__init__(message)
        self.index = index
        self.layer = layer
        self.min_pivot = min_pivot


class CacheMismatchError(FastEditError):
    """A statistics cache exists but was made for another request (model, layer, dataset, ...)."""


class EditError(FastEditError):
    """An edit failed; the model's weights were restored. Names the request and the stage."""

    def __init__(self, message: str, *, request_index=None, stage=None):
        super().__init__(message)
        self.request_index = request_index
        self.stage = stage


class ExtensionError(FastEditError, RuntimeError):
    """The compiled extension (csrc/) could not be built or loaded where it was required
    (``fastedit build-ext``, or ``FASTEDIT_REQUIRE_EXT=1``); otherwise fastedit warns once and
    uses the torch reference ops."""
