"""Tokenisation of edit prompts and the fact-token (lookup) position in them.

The lookup token is the last token of the subject (the references' ``subject_last``). It is
found from the tokenizer's character offsets on the full text the model sees, so it is right
whatever the tokenizer does at the start (a BOS token or not) and however the subject's first
word merges with what precedes it. Fast (Rust) tokenizers are therefore required.

Targets are tokenised on their own as ``" " + target`` without special tokens, and their ids are
appended to the prompt's ids. Some tokenizers encode ``prompt + " " + target`` differently from
the concatenation of the two encodings (a merge across the boundary, a SentencePiece space);
tokenising the two parts separately keeps the prompt's tokens, and so its lookup position,
exactly those of the prompt alone, and gives every prompt the same target tokens.

Batches are padded on either side; the padded positions get attention mask 0 and the real
tokens get position ids 0, 1, ... from their first real token, so that a left-padded row is
computed exactly as the same row right-padded (models with learned absolute positions, such as
GPT-2, would otherwise see shifted positions).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from fastedit import _hf
from fastedit.errors import InputError


def target_ids(tokenizer, target: str) -> list[int]:
    """Token ids of ``" " + target`` (no special tokens); raises if the target has no tokens."""
    ids = list(tokenizer(" " + target, add_special_tokens=False)["input_ids"])
    if not ids:
        raise InputError(f"target {target!r} encodes to no tokens with this tokenizer; give a non-empty target")
    return ids


def fill_subject(template: str, subject: str) -> tuple[str, int]:
    """``template`` with its ``{}`` replaced by ``subject``, and the character index just past
    the subject's last non-space character in the result."""
    at = template.find("{}")
    if at < 0 or template.find("{}", at + 2) >= 0:
        raise InputError(f"prompt {template!r} must contain '{{}}' exactly once, where the subject goes")
    if not subject.strip():
        raise InputError(f"empty subject for prompt {template!r}")
    return template[:at] + subject + template[at + 2:], at + len(subject.rstrip())


def encode_with_lookup(tokenizer, template: str, subject: str) -> tuple[list[int], int]:
    """Token ids of ``template`` with ``subject`` filled in (special tokens as the tokenizer adds
    them), and the index of the token that holds the subject's last character."""
    if not getattr(tokenizer, "is_fast", False):
        raise InputError("the tokenizer must be a fast (Rust) tokenizer, which reports character "
                         "offsets: load it with AutoTokenizer.from_pretrained(..., use_fast=True)")
    text, end = fill_subject(template, subject)
    enc = tokenizer(text, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
    last_char = end - 1
    hits = [i for i, (a, b) in enumerate(offsets) if a <= last_char < b]
    if not hits:
        raise InputError(f"no token of {text!r} covers the end of subject {subject!r}; "
                         "the tokenizer drops characters of the subject")
    return ids, hits[-1]


@dataclass
class TokenBatch:
    """A padded batch of prompts (B rows, T columns) and per-row positions, in padded coordinates.

    ``lookup[b]``: the fact token of row b. ``prompt_last[b]``: the last token of the prompt
    before any appended ids; its logits predict the first appended (target) token, so target
    token k of row b is predicted at position ``prompt_last[b] + k``.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    lookup: torch.Tensor
    prompt_last: torch.Tensor

    def inputs(self) -> dict:
        """Keyword arguments for ``model(**batch.inputs())``."""
        return dict(input_ids=self.input_ids, attention_mask=self.attention_mask,
                    position_ids=self.position_ids, use_cache=False)

    def select(self, rows: torch.Tensor) -> "TokenBatch":
        """The sub-batch of the given rows (same padding width)."""
        return TokenBatch(self.input_ids[rows], self.attention_mask[rows], self.position_ids[rows],
                          self.lookup[rows], self.prompt_last[rows])

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


@dataclass
class EncodedRows:
    """Prompts tokenised but not padded: ``ids[b]`` (prompt ids followed by the appended ids),
    ``lookup[b]`` and ``prompt_last[b]`` in the row's own coordinates (0 = its first token)."""

    ids: list
    lookup: list
    prompt_last: list

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, rows: Sequence[int]) -> "EncodedRows":
        return EncodedRows([self.ids[b] for b in rows], [self.lookup[b] for b in rows],
                           [self.prompt_last[b] for b in rows])

    def pad(self, rows: Sequence[int] | None = None, *, side: str, pad_id: int, device=None) -> TokenBatch:
        """The given rows (default all) padded into one :class:`TokenBatch`.

        ``side``: 'left' or 'right' (pads before or after the real tokens), or 'lookup': every
        lookup token in one column (the largest lookup index), the padding a row needs for that
        inserted just before its lookup token and the rest after its last token. The columns
        before that one are then the prefix that δ at the lookup token cannot change. Padding
        inside the row, not before it, keeps every padded position after a real token (some
        models' attention gives NaN on a position that may attend to nothing, e.g. Gemma 2's
        eager attention, and a NaN there reaches the real tokens through the keys). Position ids
        count real tokens, so the layout changes nothing.
        """
        rows = range(len(self.ids)) if rows is None else rows
        ids = [self.ids[b] for b in rows]
        lookup = [self.lookup[b] for b in rows]
        prompt_last = [self.prompt_last[b] for b in rows]
        if side == "lookup":
            col = max(lookup)
            width = max(col - a + len(r) for a, r in zip(lookup, ids))
        elif side in ("left", "right"):
            width = max(len(r) for r in ids)
        else:
            raise InputError(f"padding_side must be 'left' or 'right', got {side!r}")
        input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        shift = []
        for b, (a, r) in enumerate(zip(lookup, ids)):
            if side == "lookup":
                s = col - a
                pieces = ((0, r[:a]), (col, r[a:]))
            else:
                s = width - len(r) if side == "left" else 0
                pieces = ((s, r),)
            for at, part in pieces:
                input_ids[b, at:at + len(part)] = torch.tensor(part, dtype=torch.long)
                mask[b, at:at + len(part)] = 1
            shift.append(s)
        shift_t = torch.tensor(shift, dtype=torch.long)
        return TokenBatch(input_ids.to(device), mask.to(device), _hf.position_ids(mask).to(device),
                          (torch.tensor(lookup) + shift_t).to(device), (torch.tensor(prompt_last) + shift_t).to(device))


def encode_rows(tokenizer, templates: Sequence[str], subjects: Sequence[str], *,
                appended: Sequence[Sequence[int]] | None = None) -> EncodedRows:
    """Tokenise ``templates[b]`` with ``subjects[b]`` filled in and append ``appended[b]`` (token
    ids, e.g. the teacher-forced target tokens), without padding (:meth:`EncodedRows.pad`)."""
    if len(templates) != len(subjects):
        raise InputError(f"got {len(templates)} prompts but {len(subjects)} subjects; give one subject per prompt")
    if appended is not None and len(appended) != len(templates):
        raise InputError(f"got {len(templates)} prompts but {len(appended)} appended id lists")
    out = EncodedRows([], [], [])
    for b, (template, subject) in enumerate(zip(templates, subjects)):
        ids, at = encode_with_lookup(tokenizer, template, subject)
        out.prompt_last.append(len(ids) - 1)
        out.lookup.append(at)
        out.ids.append(ids + (list(appended[b]) if appended is not None else []))
    return out


def length_chunks(widths: Sequence[tuple[int, int]], max_tokens: int | None, *, group: int = 1) -> list[list[int]]:
    """Split items into chunks of at most ``max_tokens`` padded tokens, grouping similar widths.

    ``widths[i] = (a, b)``: item i's rows need ``a`` columns before their aligned column and
    ``b`` from it on (``a = 0`` for one-side padding), and each item holds ``group`` rows, so a
    chunk of items I costs ``group · |I| · (max a + max b)`` tokens. Items are sorted by (b, a),
    the part every iteration of v* recomputes first, and cut greedily, so padding is only what
    separates neighbouring widths. An item larger than the budget gets a chunk of its own.
    Everything within the budget (or ``max_tokens`` None): one chunk, in the input order.
    Returns lists of item indices.
    """
    if not widths:
        return []
    whole = group * len(widths) * (max(a for a, _ in widths) + max(b for _, b in widths))
    if max_tokens is None or whole <= max_tokens:
        return [list(range(len(widths)))]
    order = sorted(range(len(widths)), key=lambda i: (widths[i][1], widths[i][0], i))
    chunks, cur, wa, wb = [], [], 0, 0
    for i in order:
        a, b = max(wa, widths[i][0]), max(wb, widths[i][1])
        if cur and group * (len(cur) + 1) * (a + b) > max_tokens:
            chunks.append(cur)
            cur, (a, b) = [], widths[i]
        cur.append(i)
        wa, wb = a, b
    if cur:
        chunks.append(cur)
    return chunks


def check_max_tokens(max_tokens) -> None:
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int)
                                   or max_tokens < 1):
        raise InputError(f"max_chunk_tokens must be a positive integer or None, got {max_tokens!r}")


CPU_BUDGET_BYTES = 128 * 2 ** 20
CUDA_BUDGET_SHARE = 0.5


def chunk_budget_bytes(adapter) -> int:
    """The memory one chunk may use: half of the CUDA device's free memory, or a fixed
    :data:`CPU_BUDGET_BYTES` (128 MiB) on the CPU. On a CPU a chunk of a few thousand tokens
    already runs its matmuls at full speed, so a larger one would only hold more memory."""
    device = adapter.device
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0] * CUDA_BUDGET_SHARE)
    return CPU_BUDGET_BYTES


def kv_cache_bytes(adapter) -> int:
    """Bytes of one token position's key/value cache, 2d numbers per layer: part of
    :func:`token_bytes`, and the room a pass that keeps no cache may use otherwise
    (:func:`fastedit.editing.keys.hidden_cache_budget`)."""
    return 2 * adapter.d * adapter.num_layers * torch.tensor([], dtype=adapter.dtype).element_size()


def token_bytes(adapter, *, grad_layers: int = 0) -> int:
    """Bytes one token position holds at a time (an estimate). A forward without gradient keeps
    about (8d + 4 d_k) numbers of one block's activations (the MLP's gate, up, activation and
    product, the attention's projections and the residual) plus a key/value cache of 2d per
    layer; each of the ``grad_layers`` blocks a backward pass runs through keeps about
    (8d + 4 d_k) more (the inputs of its matmuls, norms and activations)."""
    size = torch.tensor([], dtype=adapter.dtype).element_size()
    return (1 + grad_layers) * (8 * adapter.d + 4 * adapter.d_k) * size + kv_cache_bytes(adapter)


def default_max_tokens(adapter, *, grad_layers: int = 0, budget_bytes: int | None = None) -> int:
    """Token positions per chunk that fit a memory budget: ``budget_bytes`` (default
    :func:`chunk_budget_bytes`: half of the CUDA device's free memory, or 128 MiB on the CPU) divided
    by :func:`token_bytes` (with ``grad_layers`` blocks differentiated). An estimate, not a
    guarantee: lower the budget (``EditParams.max_chunk_tokens``) if a chunk does not fit.
    """
    if budget_bytes is None:
        budget_bytes = chunk_budget_bytes(adapter)
    return max(1, budget_bytes // token_bytes(adapter, grad_layers=grad_layers))


def encode_prompts(tokenizer, templates: Sequence[str], subjects: Sequence[str], *,
                   appended: Sequence[Sequence[int]] | None = None, padding_side: str | None = None,
                   device=None) -> TokenBatch:
    """Tokenise ``templates[b]`` with ``subjects[b]`` filled in, append ``appended[b]`` (token
    ids, e.g. the teacher-forced target tokens), and pad into one batch.

    ``padding_side`` defaults to the tokenizer's. Position ids count real tokens only, so the
    result of a forward pass does not depend on the padding side.
    """
    side = padding_side or getattr(tokenizer, "padding_side", "right")
    if side not in ("left", "right"):
        raise InputError(f"padding_side must be 'left' or 'right', got {side!r}")
    rows = encode_rows(tokenizer, templates, subjects, appended=appended)
    return rows.pad(side=side, pad_id=_hf.pad_id(tokenizer), device=device)
