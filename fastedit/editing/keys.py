"""Reads at the lookup (last subject) token: keys, values and residual-stream outputs.

- Keys k (d_k): the input of the rewrite module (MLP output projection) of a layer.
- Values m (d): the output of the rewrite module.
- Block outputs h (d): the residual stream after a block.

Each function runs one batched forward pass per chunk of prompts (grouped by length, sized by a
token budget), stopped right after the highest module it reads (nothing above is computed), and gathers the lookup token of each row
inside the hook so that no full activation tensor is kept. Results are float32 (float64 for a
float64 model); the solvers convert to float64 themselves.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch

from fastedit import _hf, _mem
from fastedit.editing.context import check_templates, flatten
from fastedit.editing.requests import Request, validate_requests
from fastedit.editing.tokens import TokenBatch, check_max_tokens, default_max_tokens, encode_rows, length_chunks
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


def _read(model, tokenizer, adapter: ModelAdapter, texts: list[str], subjects: list[str], reads: dict, stop,
          *, padding_side, chunk_rows: int | None, max_tokens: int | None) -> dict:
    """Run the texts in chunks and return what ``reads`` gathered, rows in the texts' order.

    Chunks hold at most ``chunk_rows`` rows and ``max_tokens`` padded token positions (default
    :func:`default_max_tokens` of a forward without gradient); rows are grouped by length, so
    a chunk pads little. Only the gathered rows are kept between chunks.
    """
    require_eval(model)
    check_max_tokens(max_tokens)
    side = padding_side or getattr(tokenizer, "padding_side", "right")
    if side not in ("left", "right"):
        raise InputError(f"padding_side must be 'left' or 'right', got {side!r}")
    rows = encode_rows(tokenizer, texts, subjects)
    if max_tokens is None:
        max_tokens = default_max_tokens(adapter)
    chunks = [c[i:i + (chunk_rows or len(c))] for c in length_chunks([(0, len(r)) for r in rows.ids], max_tokens)
              for i in range(0, len(c), chunk_rows or len(c))]
    pad_id = _hf.pad_id(tokenizer)
    out: dict = {name: [] for name in reads}
    for idx in chunks:
        batch = rows.pad(idx, side=side, pad_id=pad_id, device=adapter.device)
        with torch.no_grad(), _gather_lookup(adapter, reads, batch) as got:
            forward_until(model, stop, **batch.inputs())
        for name in reads:
            out[name].append(got[name])
        del batch, got
        _mem.trim(adapter.device)  # the chunk's activations are gone: give their pages back
    dtype = torch.promote_types(adapter.dtype, torch.float32)
    back = torch.argsort(torch.tensor([i for c in chunks for i in c])).to(adapter.device)
    return {name: torch.cat(parts).index_select(0, back).to(dtype) for name, parts in out.items()}


def _check_chunk(chunk_size) -> None:
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise InputError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")


def compute_keys(model, tokenizer, adapter: ModelAdapter, requests: Sequence[Request], layers: Sequence[int], *,
                 templates: list[list[str]], padding_side: str | None = None,
                 chunk_size: int | None = None, max_chunk_tokens: int | None = None) -> dict[int, torch.Tensor]:
    """Keys K_l (d_k, n) of each layer l in ``layers``, averaged over the context templates.

    For request i, k_i = mean over template groups g of (mean over templates t in g of the
    rewrite-module input at the lookup token of ``t`` applied to the request's prompt). With the
    standard templates [["{}"], [n generated]] that is ½·k(bare prompt) + ½·mean(k(contexts))
    (ALGORITHMS.md section 11). One forward pass per chunk serves all layers, stopped after the
    highest layer's rewrite module; chunks hold at most ``chunk_size`` requests' prompts and
    ``max_chunk_tokens`` padded token positions (default from the device's memory).
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
                max_tokens=max_chunk_tokens)
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
