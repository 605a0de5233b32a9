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
from torch.utils.checkpoint import checkpoint

from fastedit import _hf
from fastedit.models.adapters import ModelAdapter
from fastedit.models.hooks import _hidden


class BlockReplay:
    """The blocks ``first..last`` of one recorded forward pass, callable on a new hidden state."""

    def __init__(self, adapter: ModelAdapter, first: int, last: int):
        self.adapter = adapter
        self.first, self.last = first, last
        self.calls: dict[int, tuple[tuple, dict]] = {}

    def _block(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        args, kwargs = self.calls[layer]
        if "hidden_states" in kwargs:
            out = self.adapter.block(layer)(*args, **{**kwargs, "hidden_states": hidden})
        else:
            out = self.adapter.block(layer)(hidden, *args[1:], **kwargs)
        return _hidden(out)

    def run(self, hidden: torch.Tensor, *, checkpointed: bool = False) -> torch.Tensor:
        """Output hidden state of block ``last`` when block ``first`` receives ``hidden``.

        ``hidden`` has the recorded pass's shape (batch, seq, d); the blocks' other inputs
        (attention mask, position embeddings, a key/value cache, ...) are those of the recorded
        pass. ``checkpointed``: keep only each block's input for the backward pass and recompute
        the block there (activation checkpointing: the same values, less memory, one more
        forward). A recorded :class:`PrefixCache` must then be restored before the backward.
        """
        if len(self.calls) != self.last - self.first + 1:
            raise RuntimeError(f"blocks {self.first}..{self.last} were not all run in the recorded forward pass")
        for layer in range(self.first, self.last + 1):
            if checkpointed and hidden.requires_grad:
                hidden = checkpoint(self._block, layer, hidden, use_reentrant=False)
            else:
                hidden = self._block(layer, hidden)
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


class PrefixCache:
    """The key/value cache of a batch's first ``split`` columns (the prefix), for passes over
    the remaining columns (the suffix) that must see the prefix as if it were run with them.

    Built by one no-gradient forward over the prefix, stopped after block ``stop``. Each suffix
    pass appends its keys and values to the cache; :meth:`restore` puts back the prefix-only
    state (every cache layer's attributes as they were after the prefix pass), so the same
    suffix can be run again, with another hidden state, as often as needed. Only dynamic caches
    (which replace their tensors on update instead of writing into them) can be restored so;
    :func:`fastedit.editing.targets.compute_targets` checks the suffix pass against the full
    model before it relies on it.
    """

    def __init__(self, model, adapter: ModelAdapter, stop: int, input_ids, attention_mask, position_ids):
        from transformers import DynamicCache

        from fastedit.models.hooks import forward_until

        self.name = _hf.cache_argument(model)
        self.cache = DynamicCache(config=model.config)
        with torch.no_grad():
            forward_until(model, adapter.block(stop), input_ids=input_ids, attention_mask=attention_mask,
                          position_ids=position_ids, use_cache=True, **{self.name: self.cache})
        self.state = [dict(vars(layer)) for layer in self.cache.layers]

    def kwargs(self) -> dict:
        """Keyword arguments that make a model forward use (and extend) this cache."""
        return {self.name: self.cache, "use_cache": True}

    def restore(self) -> None:
        """Back to the state right after the prefix pass."""
        for layer, state in zip(self.cache.layers, self.state):
            vars(layer).clear()
            vars(layer).update(state)


def logits_from_hidden(adapter: ModelAdapter, hidden: torch.Tensor) -> torch.Tensor:
    """The logits the model reads from a last-block output (..., d): :meth:`ModelAdapter.logits`
    (``lm_head(final_norm(hidden))``, soft-capped where the model does so). Callers check it
    against a real forward, so a model with other output processing is refused, not misread.
    """
    return adapter.logits(hidden)
