"""Re-run the upper blocks of a model from a given hidden state, without the layers below.

Optimising an offset added at block l's output (v*, ALGORITHMS.md section 5) needs, at every
step, the blocks above l only: what comes in from below does not change. Rather than rebuilding
each architecture's attention masks and position embeddings by hand (which differ per model and
per transformers version), :func:`record_blocks` records the exact extra arguments every block
received on one real forward pass; :meth:`BlockReplay.run` then calls those blocks again with a
new hidden state and the recorded arguments. Whatever the model computes before its layer loop
(masks, rotary tables, per-layer sliding-window masks) is thus reused as the model built it.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from fastedit.models.adapters import ModelAdapter
from fastedit.models.hooks import _hidden


class BlockReplay:
    """The blocks ``first..last`` of one recorded forward pass, callable on a new hidden state."""

    def __init__(self, adapter: ModelAdapter, first: int, last: int):
        self.adapter = adapter
        self.first, self.last = first, last
        self.calls: dict[int, tuple[tuple, dict]] = {}

    def run(self, hidden: torch.Tensor) -> torch.Tensor:
        """Output hidden state of block ``last`` when block ``first`` receives ``hidden``.

        ``hidden`` has the recorded pass's shape (batch, seq, d); the blocks' other inputs
        (attention mask, position embeddings, ...) are those of the recorded pass.
        """
        if len(self.calls) != self.last - self.first + 1:
            raise RuntimeError(f"blocks {self.first}..{self.last} were not all run in the recorded forward pass")
        for layer in range(self.first, self.last + 1):
            args, kwargs = self.calls[layer]
            if "hidden_states" in kwargs:
                out = self.adapter.block(layer)(*args, **{**kwargs, "hidden_states": hidden})
            else:
                out = self.adapter.block(layer)(hidden, *args[1:], **kwargs)
            hidden = _hidden(out)
        return hidden


@contextlib.contextmanager
def record_blocks(adapter: ModelAdapter, first: int, last: int) -> Iterator[BlockReplay]:
    """Record the inputs of blocks ``first..last`` on the next forward pass run in the body.

    Run the model with ``use_cache=False`` (a cache object would be replayed too). The
    recorded tensors are kept by reference; nothing is copied.
    """
    adapter.check_layer(first)
    adapter.check_layer(last)
    replay = BlockReplay(adapter, first, last)
    handles = []

    def make(layer):
        def hook(mod, args, kwargs):
            replay.calls[layer] = (args, dict(kwargs))
        return hook

    try:
        for layer in range(first, last + 1):
            handles.append(adapter.block(layer).register_forward_pre_hook(make(layer), with_kwargs=True))
        yield replay
    finally:
        for h in handles:
            h.remove()


def logits_from_hidden(adapter: ModelAdapter, hidden: torch.Tensor) -> torch.Tensor:
    """The logits the model reads from a last-block output (..., d): :meth:`ModelAdapter.logits`
    (``lm_head(final_norm(hidden))``, soft-capped where the model does so). Callers check it
    against a real forward, so a model with other output processing is refused, not misread.
    """
    return adapter.logits(hidden)
