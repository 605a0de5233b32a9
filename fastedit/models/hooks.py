"""Forward hooks to read keys, values and block outputs, and to add offsets to block outputs.

Each is a context manager that removes its hooks on exit, also when the body raises.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from torch import nn


def _hidden(output):
    """The hidden-state tensor of a block's output (a tensor, or a tuple whose first item it is)."""
    return output[0] if isinstance(output, (tuple, list)) else output


def _replace_hidden(output, hidden):
    if isinstance(output, tuple):
        return (hidden, *output[1:])
    if isinstance(output, list):
        return [hidden, *output[1:]]
    return hidden


@contextlib.contextmanager
def capture(modules: dict, *, inputs: bool = False, detach: bool = True) -> Iterator[dict]:
    """Record the output (or the first positional input) of each named module on every forward.

    Yields a dict name -> tensor of the last forward (overwritten on each call). Block outputs
    are unwrapped from their tuples. With ``detach`` the tensor is a copy: some models change a
    module's output in place after it returns (Falcon adds the attention output to its MLP
    output with ``+=``), which would rewrite a mere view. Without it, the tensor itself (in
    the autograd graph) is kept.
    """
    store: dict = {}
    handles = []

    def make(name):
        def hook(mod, args, output):
            t = args[0] if inputs else _hidden(output)
            store[name] = t.detach().clone() if detach else t
        return hook

    try:
        for name, mod in modules.items():
            handles.append(mod.register_forward_hook(make(name)))
        yield store
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def edit_output(module: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Replace a module's (hidden-state) output h by ``fn(h)`` during the body."""

    def hook(mod, args, output):
        return _replace_hidden(output, fn(_hidden(output)))

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


class StopForward(Exception):
    """Raised inside a forward pass by :func:`forward_until` to skip the layers above."""


def forward_until(model: nn.Module, module: nn.Module, *args, **kwargs) -> None:
    """Run ``model(*args, **kwargs)`` but stop right after ``module`` has run.

    Used by passes that only need activations up to a layer (statistics, keys): nothing
    above ``module`` is computed. Combine with :func:`capture` to read what is needed.
    """

    def hook(mod, inputs, output):
        raise StopForward

    handle = module.register_forward_hook(hook)
    try:
        model(*args, **kwargs)
    except StopForward:
        pass
    finally:
        handle.remove()
