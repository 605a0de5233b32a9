"""Reads at the lookup (last subject) token: keys, values and residual-stream outputs.

- Keys k (d_k): the input of the rewrite module (MLP output projection) of a layer.
- Values m (d): the output of the rewrite module.
- Block outputs h (d): the residual stream after a block.

Each function runs one batched forward pass per chunk of prompts (grouped by length, sized by a
token budget), stopped right after the highest module it reads (nothing above is computed), and gathers the lookup token of each row
inside the hook so that no full activation tensor is kept. Every read is at a row's lookup token,
which a causal model computes from the tokens up to it: each prompt is cut after its lookup token
before padding. Results are float32 (float64 for a float64 model); the solvers convert to float64
themselves.

Key passes of successive edited layers (:class:`HiddenCache`): a method edits layers l1 < l2 < ...
in order, reading the keys of one batch at each just before editing it. The blocks below l_i
have not changed since l_i's key pass, so the hidden states entering block l_i on those prompts
are kept, and l_{i+1}'s pass starts there (block l_i, whose weight has just changed, runs again;
the blocks below it are skipped). Same blocks, same inputs, same chunks: the keys are bit for bit
those of a pass from the embeddings. Kept only within a memory budget (:func:`hidden_cache_budget`);
a chunk whose states do not fit is recomputed from the embeddings, with the same result.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch

from fastedit import _hf, _mem
from fastedit.editing.context import check_templates, flatten
from fastedit.editing.requests import Request, validate_requests
from fastedit.editing.tokens import (EncodedRows, TokenBatch, check_max_tokens, default_max_tokens, encode_rows,
                                     kv_cache_bytes, length_chunks)
from fastedit.errors import InputError
from fastedit.models import ModelAdapter, forward_until
from fastedit.models.hooks import _hidden


def require_eval(model) -> None:
    """Refuse a model in training mode: dropout would make every read (and v*) random."""
    if model.training:
        raise InputError("the model is in training mode, so dropout would randomise the activations "
                         "read here: call model.eval() first")


@contextlib.contextmanager
def _gather_lookup(adapter: ModelAdapter, reads: dict, batch: TokenBatch) -> Iterator[dict]:
    """reads: name -> (module, inputs?). Yields name -> (B, width) rows at each row's lookup."""
    store: dict = {}
    rows = torch.arange(len(batch), device=batch.lookup.device)
    handles = []

    def make(name, use_input):
        def hook(mod, args, output):
            t = adapter.as_tokens(args[0] if use_input else _hidden(output), batch.input_ids.shape)
            store[name] = t[rows, batch.lookup].detach()
        return hook

    try:
        for name, (module, use_input) in reads.items():
            handles.append(module.register_forward_hook(make(name, use_input)))
        yield store
    finally:
        for h in handles:
            h.remove()


def hidden_cache_budget(adapter: ModelAdapter, max_tokens: int) -> int:
    """Bytes a :class:`HiddenCache` may hold next to passes of ``max_tokens``-position chunks: the
    room :func:`fastedit.editing.tokens.token_bytes` sets aside per token for a key/value cache
    (:func:`~fastedit.editing.tokens.kv_cache_bytes`, 2·d per layer), which the key and residual
    passes (``use_cache=False``) never fill. So up to 2·num_layers·max_tokens cached positions of
    d numbers each, and such a pass with the cache stays within the memory one chunk is budgeted for."""
    return int(max_tokens) * kv_cache_bytes(adapter)


class HiddenCache:
    """The hidden states entering one block (``start``) on the chunks of one key pass, for the next
    key pass over the same prompts to start there (see the module docstring).

    Valid while no block below ``start`` changes: :meth:`changed` says a layer's weight did (the
    cache is dropped when that layer is below ``start``). A pass over other prompts or chunks
    ignores it and replaces it. ``budget_bytes`` (default :func:`hidden_cache_budget` of the
    pass's chunk budget) bounds what is kept; chunks beyond it are not kept. ``blocks_run``
    counts the blocks the passes that used this cache computed, ``blocks_skipped`` those skipped.
    """

    def __init__(self, budget_bytes: int | None = None):
        if budget_bytes is not None and (isinstance(budget_bytes, bool) or not isinstance(budget_bytes, int)
                                         or budget_bytes < 0):
            raise InputError(f"budget_bytes must be a non-negative integer or None, got {budget_bytes!r}")
        self.budget_bytes = budget_bytes
        self.clear()
        self.blocks_run = 0
        self.blocks_skipped = 0

    def clear(self) -> None:
        self.key = None
        self.start: int | None = None
        self.states: dict[int, torch.Tensor] = {}
        self.output_len: int | None = None  # the blocks' outputs: a tensor (None) or a tuple of this length

    def changed(self, layer: int) -> None:
        """Layer ``layer``'s block changed (its weight was edited)."""
        if self.start is not None and layer < self.start:
            self.clear()

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.states.values())


@contextlib.contextmanager
def _record_input(adapter: ModelAdapter, layer: int, into: dict) -> Iterator[None]:
    """Keep a copy of the hidden state entering block ``layer`` (``into["h"]``), and check that it
    is the very output of the block below (``into["direct"]``): the model's layer loop hands each
    block's output to the next one unchanged, which is what starting a pass at a block relies on."""
    handles = []

    def pre(mod, args, kwargs):
        h = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        into["h"] = h.detach().clone()
        into["direct"] = layer == 0 or h is into.get("below")

    def below(mod, args, output):
        into["below"] = _hidden(output)
        into["output_len"] = len(output) if isinstance(output, tuple) else None
        # A tensor, or a tuple whose other items (attention weights: BLOOM, Falcon) the model's
        # loop reads only when asked to output attentions.
        into["plain"] = isinstance(output, torch.Tensor) or (
            isinstance(output, tuple) and not getattr(getattr(adapter.model, "config", None), "output_attentions", False))

    try:
        handles.append(adapter.block(layer).register_forward_pre_hook(pre, with_kwargs=True, prepend=True))
        if layer > 0:
            handles.append(adapter.block(layer - 1).register_forward_hook(below))
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def _start_at(adapter: ModelAdapter, start: int, hidden: torch.Tensor, output_len: int | None) -> Iterator[None]:
    """Inside, a forward pass skips blocks ``0..start-1`` (each hands its input on, as the model's
    loop expects a block's output: the tensor, or a tuple of ``output_len`` with None after it)
    and block ``start`` receives ``hidden`` instead."""
    saved = []

    def skip(*args, **kwargs):
        h = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        return h if output_len is None else (h,) + (None,) * (output_len - 1)

    def swap(mod, args, kwargs):
        if "hidden_states" in kwargs:
            return args, {**kwargs, "hidden_states": hidden}
        return (hidden, *args[1:]), kwargs

    handle = adapter.block(start).register_forward_pre_hook(swap, with_kwargs=True, prepend=True)
    try:
        for j in range(start):
            block = adapter.block(j)
            saved.append((block, vars(block).get("forward")))
            block.forward = skip
        yield
    finally:
        handle.remove()
        for block, own in saved:
            if own is None:
                del block.forward
            else:
                block.forward = own


def _read_cached(model, adapter: ModelAdapter, rows: EncodedRows, chunks: list, key, reads: dict, stop, out: dict,
                 cache: HiddenCache, span: tuple[int, int], *, side: str, pad_id: int, max_tokens: int) -> None:
    """:func:`_read`'s chunk loop with a :class:`HiddenCache`: each chunk starts from its kept
    state where the cache holds one for these chunks at or below ``span[0]``, and leaves the
    state entering block ``span[0]`` within the budget."""
    cache_layer, highest = span
    start = cache.start if cache.key == key and cache.start is not None and cache.start <= cache_layer else None
    budget = cache.budget_bytes if cache.budget_bytes is not None else hidden_cache_budget(adapter, max_tokens)
    old, cache.states, kept, output_len = (cache.states if start is not None else {}), {}, 0, cache.output_len
    for ci, idx in enumerate(chunks):
        batch = rows.pad(idx, side=side, pad_id=pad_id, device=adapter.device)
        state = old.pop(ci, None)
        begin = start if state is not None else 0
        # Recorded unless this pass starts at the very block (then its state is the one kept).
        record, recorded = cache_layer > 0 and begin < cache_layer, {}
        with torch.no_grad(), contextlib.ExitStack() as stack:
            got = stack.enter_context(_gather_lookup(adapter, reads, batch))
            if record:
                stack.enter_context(_record_input(adapter, cache_layer, recorded))
            if begin > 0:
                stack.enter_context(_start_at(adapter, begin, state, output_len))
            forward_until(model, stop, **batch.inputs())
        cache.blocks_run += highest + 1 - begin
        cache.blocks_skipped += begin
        new = state if begin == cache_layer and begin > 0 else None
        if record and recorded.get("direct") and recorded.get("plain"):
            new, output_len = recorded["h"], recorded["output_len"]
        if new is not None and kept + new.numel() * new.element_size() <= budget:
            cache.states[ci] = new
            kept += new.numel() * new.element_size()
        for name in reads:
            out[name].append(got[name])
        del batch, got, recorded, state, new
        _mem.trim(adapter.device)  # the chunk's activations are gone: give their pages back
    cache.key, cache.start, cache.output_len = key, cache_layer, output_len
    if not cache.states:
        cache.clear()


def _read(model, tokenizer, adapter: ModelAdapter, texts: list[str], subjects: list[str], reads: dict, stop,
          *, padding_side, chunk_rows: int | None, max_tokens: int | None, cache: HiddenCache | None = None,
          span: tuple[int, int] | None = None) -> dict:
    """Run the texts in chunks and return what ``reads`` gathered, rows in the texts' order.

    Chunks hold at most ``chunk_rows`` rows and ``max_tokens`` padded token positions (default
    :func:`default_max_tokens` of a forward without gradient); rows are cut after their lookup
    token and grouped by length, so a chunk pads little. Only the gathered rows are kept between
    chunks, and, with ``cache`` and ``span`` = (lowest, highest) block the reads are in, the
    hidden states entering the lowest: a pass over the same rows and chunks whose cache starts at
    or below its lowest block starts there.
    """
    require_eval(model)
    check_max_tokens(max_tokens)
    side = padding_side or getattr(tokenizer, "padding_side", "right")
    if side not in ("left", "right"):
        raise InputError(f"padding_side must be 'left' or 'right', got {side!r}")
    full = encode_rows(tokenizer, texts, subjects)
    rows = EncodedRows([ids[:at + 1] for ids, at in zip(full.ids, full.lookup)], full.lookup,
                       [min(p, at) for p, at in zip(full.prompt_last, full.lookup)])
    if max_tokens is None:
        max_tokens = default_max_tokens(adapter)
    chunks = [c[i:i + (chunk_rows or len(c))] for c in length_chunks([(0, len(r)) for r in rows.ids], max_tokens)
              for i in range(0, len(c), chunk_rows or len(c))]
    pad_id = _hf.pad_id(tokenizer)
    key = (id(model), rows.ids, side, chunks)
    out: dict = {name: [] for name in reads}
    if cache is None:
        for idx in chunks:
            batch = rows.pad(idx, side=side, pad_id=pad_id, device=adapter.device)
            with torch.no_grad(), _gather_lookup(adapter, reads, batch) as got:
                forward_until(model, stop, **batch.inputs())
            for name in reads:
                out[name].append(got[name])
            del batch, got
            _mem.trim(adapter.device)  # the chunk's activations are gone: give their pages back
    else:
        try:
            _read_cached(model, adapter, rows, chunks, key, reads, stop, out, cache, span, side=side, pad_id=pad_id,
                         max_tokens=max_tokens)
        except BaseException:
            cache.clear()
            raise
    dtype = torch.promote_types(adapter.dtype, torch.float32)
    back = torch.argsort(torch.tensor([i for c in chunks for i in c])).to(adapter.device)
    return {name: torch.cat(parts).index_select(0, back).to(dtype) for name, parts in out.items()}


def _check_chunk(chunk_size) -> None:
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise InputError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")


def compute_keys(model, tokenizer, adapter: ModelAdapter, requests: Sequence[Request], layers: Sequence[int], *,
                 templates: list[list[str]], padding_side: str | None = None,
                 chunk_size: int | None = None, max_chunk_tokens: int | None = None,
                 cache: HiddenCache | None = None) -> dict[int, torch.Tensor]:
    """Keys K_l (d_k, n) of each layer l in ``layers``, averaged over the context templates.

    For request i, k_i = mean over template groups g of (mean over templates t in g of the
    rewrite-module input at the lookup token of ``t`` applied to the request's prompt). With the
    standard templates [["{}"], [n generated]] that is ½·k(bare prompt) + ½·mean(k(contexts))
    (ALGORITHMS.md section 11). One forward pass per chunk serves all layers, stopped after the
    highest layer's rewrite module; chunks hold at most ``chunk_size`` requests' prompts and
    ``max_chunk_tokens`` padded token positions (default from the device's memory).

    ``cache``: a :class:`HiddenCache` shared by the key passes of one batch's edited layers, in
    increasing order; the pass starts where the previous one left its states (when they are for
    the same prompts and no block below has changed since: tell it with ``cache.changed(layer)``)
    and leaves the states entering block ``min(layers)``. The same keys either way.
    """
    validate_requests(requests)
    groups = check_templates(templates)
    _check_chunk(chunk_size)
    layers = [adapter.check_layer(layer) for layer in layers]
    if not layers:
        raise InputError("layers is empty: give at least one layer to read keys at")
    flat = flatten(groups)
    texts = [t.replace("{}", r.prompt, 1) for r in requests for t in flat]
    subjects = [r.subject for r in requests for _ in flat]
    reads = {layer: (adapter.rewrite_module(layer), True) for layer in set(layers)}
    got = _read(model, tokenizer, adapter, texts, subjects, reads, adapter.rewrite_module(max(layers)),
                padding_side=padding_side, chunk_rows=chunk_size and chunk_size * len(flat),
                max_tokens=max_chunk_tokens, cache=cache, span=(min(layers), max(layers)))
    bounds = torch.tensor([0] + [len(g) for g in groups]).cumsum(0).tolist()
    out = {}
    for layer in layers:
        k = got[layer].reshape(len(requests), len(flat), adapter.d_k)
        per_group = torch.stack([k[:, a:b].mean(1) for a, b in zip(bounds[:-1], bounds[1:])], dim=1)
        out[layer] = per_group.mean(1).T.contiguous()
    return out


def block_outputs_at_lookup(model, tokenizer, adapter: ModelAdapter, requests: Sequence[Request], layer: int, *,
                            padding_side: str | None = None, chunk_size: int | None = None,
                            max_chunk_tokens: int | None = None) -> torch.Tensor:
    """h (n, d): block ``layer``'s output (the residual stream, ``hidden_states[layer + 1]``) at the
    lookup token of each request's bare prompt (MEMIT's ``cur`` in R = z − cur)."""
    validate_requests(requests)
    _check_chunk(chunk_size)
    block = adapter.block(layer)
    got = _read(model, tokenizer, adapter, [r.prompt for r in requests], [r.subject for r in requests],
                {"h": (block, False)}, block, padding_side=padding_side, chunk_rows=chunk_size,
                max_tokens=max_chunk_tokens)
    return got["h"]


def values_at_lookup(model, tokenizer, adapter: ModelAdapter, requests: Sequence[Request], layer: int, *,
                     padding_side: str | None = None, chunk_size: int | None = None,
                     max_chunk_tokens: int | None = None) -> torch.Tensor:
    """v0 (n, d): the rewrite module's output at the lookup token of each request's bare prompt
    (NAS: v* = v0 + δ; the same as :attr:`Targets.v0` on the same model)."""
    validate_requests(requests)
    _check_chunk(chunk_size)
    module = adapter.rewrite_module(layer)
    got = _read(model, tokenizer, adapter, [r.prompt for r in requests], [r.subject for r in requests],
                {"v": (module, False)}, module, padding_side=padding_side, chunk_rows=chunk_size,
                max_tokens=max_chunk_tokens)
    return got["v"]
