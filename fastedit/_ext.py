"""Loader of the compiled extension (csrc/). Placeholder until the extension lands: nothing is
compiled yet, so every caller takes the torch reference path."""
from __future__ import annotations


def available() -> bool:
    return False


def load():
    return None
