"""fastedit: fast, exact locate-then-edit knowledge editing.

Importing fastedit is cheap: it imports torch but never initialises CUDA, never compiles the
extension and does not import transformers. Heavier pieces load on first attribute access.
"""
from __future__ import annotations

import importlib

from fastedit._version import __version__
from fastedit import errors, linalg

_LAZY_MODULES = {"kernels", "models", "editing", "stats", "eval", "testbed", "presets", "cli", "compat"}
_LAZY_ATTRS = {
    "Editor": ("fastedit.editing", "Editor"),
}

__all__ = ["__version__", "errors", "linalg", "Editor", *sorted(_LAZY_MODULES)]


def __getattr__(name):
    if name in _LAZY_MODULES:
        return importlib.import_module(f"fastedit.{name}")
    if name in _LAZY_ATTRS:
        module, attr = _LAZY_ATTRS[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'fastedit' has no attribute {name!r}")
