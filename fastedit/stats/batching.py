"""Tokenize documents, truncate them, and pack them into padded batches under a token budget.

Packing is greedy and keeps the corpus order (no sort, so it streams): a document joins the
current batch while ``(batch size + 1) * longest length`` stays within ``token_budget``,
otherwise the batch is emitted and a new one starts. Emitted batches never cut a document,
so "documents consumed" after a batch is a resumable position.
"""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import torch

from fastedit import _hf
from fastedit.errors import InputError

#: Documents tokenized together (fast tokenizers are much quicker on lists than one by one).
_TOKENIZE_CHUNK = 64


@dataclass
class Batch:
    """A padded batch: ``input_ids``, ``attention_mask`` (1 = real token) and
    ``position_ids`` (b, L); ``end`` is the position in the selection just past its last
    document."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    end: int

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())


def _is_token_ids(doc) -> bool:
    if isinstance(doc, torch.Tensor):
        return doc.dim() == 1 and not doc.is_floating_point()
    return isinstance(doc, (list, tuple)) and all(isinstance(t, int) for t in doc)


def tokenize(docs: Iterable, tokenizer, max_length: int) -> Iterator[list[int]]:
    """Token ids of each document, truncated to its first ``max_length`` tokens.

    Strings go through ``tokenizer`` with its special tokens (BOS included where the tokenizer
    adds one, as the references count it); token-id sequences are used as given.
    """
    pending: list[str] = []

    def flush():
        ids = tokenizer(pending, truncation=True, max_length=max_length)["input_ids"]
        pending.clear()
        return ids

    for doc in docs:
        if isinstance(doc, str):
            if tokenizer is None:
                raise InputError("the corpus holds text but no tokenizer was given; pass the model's tokenizer "
                                 "or a corpus of token ids")
            pending.append(doc)
            if len(pending) == _TOKENIZE_CHUNK:
                yield from flush()
        elif _is_token_ids(doc):
            if pending:
                yield from flush()
            ids = doc.tolist() if isinstance(doc, torch.Tensor) else list(doc)
            yield ids[:max_length]
        else:
            raise InputError(f"a document must be a string or a sequence of token ids, got {type(doc).__name__}")
    if pending:
        yield from flush()


def pack(token_lists: Iterable[Sequence[int]], token_budget: int, *, pad_id: int = 0,
         padding_side: str = "right", start: int = 0) -> Iterator[Batch]:
    """Pack token lists, in order, into batches with ``rows * longest <= token_budget``.

    ``start`` is the selection position of the first list (so ``Batch.end`` counts from it).
    Empty documents are consumed with the batch they fall in and contribute no token.
    ``position_ids`` count real tokens only, so left and right padding give the same
    positions to the same tokens.
    """
    if padding_side not in ("left", "right"):
        raise InputError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    rows: list[Sequence[int]] = []
    longest = 0
    pos = start
    for ids in token_lists:
        n = len(ids)
        if n > token_budget:
            raise InputError(f"a document of {n} tokens exceeds token_budget={token_budget}; raise the token "
                             "budget (--token-budget) or lower max_length (--max-length)")
        if n and rows and (len(rows) + 1) * max(longest, n) > token_budget:
            yield _pad(rows, longest, pad_id, padding_side, pos)
            rows, longest = [], 0
        if n:
            rows.append(ids)
            longest = max(longest, n)
        pos += 1
    if rows:
        yield _pad(rows, longest, pad_id, padding_side, pos)


def _pad(rows, length, pad_id, side, end) -> Batch:
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for r, toks in enumerate(rows):
        sl = slice(length - len(toks), length) if side == "left" else slice(0, len(toks))
        ids[r, sl] = torch.as_tensor(toks, dtype=torch.long)
        mask[r, sl] = 1
    positions = _hf.position_ids(mask)
    return Batch(ids, mask, positions, end)


def prefetch(items: Iterable, depth: int = 4) -> Iterator:
    """Yield ``items`` in order, produced by a background thread up to ``depth`` ahead.

    Reading, tokenizing and packing the next batches then overlaps the forward pass of the
    current one (tokenizers release the GIL). An exception in the producer is raised here;
    leaving the loop early stops the producer.
    """
    buffer: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def produce():
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        buffer.put((item, None), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            buffer.put((done, None))
        except BaseException as exc:  # handed to the consumer, which re-raises it
            buffer.put((done, exc))

    worker = threading.Thread(target=produce, name="fastedit-stats-prefetch", daemon=True)
    worker.start()
    try:
        while True:
            item, exc = buffer.get()
            if item is done:
                if exc is not None:
                    raise exc
                return
            yield item
    finally:
        stop.set()
        while worker.is_alive():
            try:
                buffer.get(timeout=0.1)
            except queue.Empty:
                pass
        worker.join()
