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


def encode_prompts(tokenizer, templates: Sequence[str], subjects: Sequence[str], *,
                   appended: Sequence[Sequence[int]] | None = None, padding_side: str | None = None,
                   device=None) -> TokenBatch:
    """Tokenise ``templates[b]`` with ``subjects[b]`` filled in, append ``appended[b]`` (token
    ids, e.g. the teacher-forced target tokens), and pad into one batch.

    ``padding_side`` defaults to the tokenizer's. Position ids count real tokens only, so the
    result of a forward pass does not depend on the padding side.
    """
    if len(templates) != len(subjects):
        raise InputError(f"got {len(templates)} prompts but {len(subjects)} subjects; give one subject per prompt")
    if appended is not None and len(appended) != len(templates):
        raise InputError(f"got {len(templates)} prompts but {len(appended)} appended id lists")
    side = padding_side or getattr(tokenizer, "padding_side", "right")
    if side not in ("left", "right"):
        raise InputError(f"padding_side must be 'left' or 'right', got {side!r}")
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    rows, lookup, prompt_last = [], [], []
    for b, (template, subject) in enumerate(zip(templates, subjects)):
        ids, at = encode_with_lookup(tokenizer, template, subject)
        prompt_last.append(len(ids) - 1)
        lookup.append(at)
        rows.append(ids + (list(appended[b]) if appended is not None else []))
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    shift = []
    for b, r in enumerate(rows):
        s = width - len(r) if side == "left" else 0
        input_ids[b, s:s + len(r)] = torch.tensor(r, dtype=torch.long)
        mask[b, s:s + len(r)] = 1
        shift.append(s)
    shift_t = torch.tensor(shift, dtype=torch.long)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    return TokenBatch(input_ids.to(device), mask.to(device), position_ids.to(device),
                      (torch.tensor(lookup) + shift_t).to(device), (torch.tensor(prompt_last) + shift_t).to(device))
