"""Batched teacher-forced scoring of prompt + target pairs, and batched greedy next tokens.

A pair (prompt, target) is tokenised as ``tok(prompt)`` (with the tokenizer's BOS, if any)
followed by ``tok(" " + target)`` without special tokens, as the references do. The logits at
position ``len(prompt_ids) - 1 + j`` predict target token ``j``. Pairs are padded into one
tensor per batch; with left padding the position ids are ``cumsum(mask) - 1`` so every row
sees the same positions as it would alone.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from fastedit import _hf
from fastedit.errors import InputError


@dataclass
class EncodedPairs:
    """A padded batch of prompt + target sequences.

    input_ids, attention_mask, position_ids: (B, T). target_ids: (B, L) target tokens
    (padding = 0), target_pos: (B, L) index of the logits that predict each target token,
    target_mask: (B, L) True for real target tokens. L is the longest target.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    target_ids: torch.Tensor
    target_pos: torch.Tensor
    target_mask: torch.Tensor


def _tokenize_pairs(tokenizer, prompts: Sequence[str], targets: Sequence[str]) -> tuple[list, list]:
    """(prompt ids, target ids) of each pair, with the checks every scorer needs."""
    if len(prompts) != len(targets):
        raise InputError(f"got {len(prompts)} prompts but {len(targets)} targets; pass one target per prompt")
    for i, t in enumerate(targets):
        if not isinstance(t, str) or not t.strip():
            raise InputError(f"target {i} ({t!r}) is empty; every prompt needs a non-empty target string")
    if len(prompts) == 0:
        return [], []
    p_ids = tokenizer(list(prompts))["input_ids"]
    t_ids = tokenizer([" " + t.lstrip(" ") for t in targets], add_special_tokens=False)["input_ids"]
    for i, (p, t) in enumerate(zip(p_ids, t_ids)):
        if not t:
            raise InputError(f"target {i} ({targets[i]!r}) tokenises to nothing; targets must be non-empty")
        if not p:
            raise InputError(f"prompt {i} is empty and the tokenizer adds no BOS token, so nothing "
                             "predicts the target's first token; give a non-empty prompt")
    return p_ids, t_ids


def _padded(seqs: Sequence[Sequence[int]], pad: int, side: str) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """(input_ids, attention_mask, offsets): ``seqs`` padded on ``side``; row b starts at offsets[b]."""
    T = max(len(x) for x in seqs)
    input_ids = torch.full((len(seqs), T), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    offsets = []
    for b, x in enumerate(seqs):
        off = T - len(x) if side == "left" else 0
        input_ids[b, off: off + len(x)] = torch.tensor(x, dtype=torch.long)
        mask[b, off: off + len(x)] = 1
        offsets.append(off)
    return input_ids, mask, offsets


def encode_pairs(tokenizer, prompts: Sequence[str], targets: Sequence[str], *,
                 padding_side: str = "right") -> EncodedPairs:
    """Tokenise and pad ``prompts[i] + " " + targets[i]`` (see the module docstring)."""
    if padding_side not in ("left", "right"):
        raise InputError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if len(prompts) == 0 and len(targets) == 0:
        raise InputError("no prompts to score")
    p_ids, t_ids = _tokenize_pairs(tokenizer, prompts, targets)
    input_ids, mask, offsets = _padded([p + t for p, t in zip(p_ids, t_ids)], _hf.pad_id(tokenizer), padding_side)
    B, L = len(p_ids), max(len(t) for t in t_ids)
    target_ids = torch.zeros((B, L), dtype=torch.long)
    target_pos = torch.zeros((B, L), dtype=torch.long)
    target_mask = torch.zeros((B, L), dtype=torch.bool)
    for i, (p, t) in enumerate(zip(p_ids, t_ids)):
        target_ids[i, : len(t)] = torch.tensor(t)
        target_pos[i, : len(t)] = offsets[i] + len(p) - 1 + torch.arange(len(t))
        target_mask[i, : len(t)] = True
    return EncodedPairs(input_ids, mask, _hf.position_ids(mask), target_ids, target_pos, target_mask)


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def score_pairs(model, enc: EncodedPairs) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward over a padded batch.

    Returns ``nll`` (B,) = -(1/L_i) Σ_j log p(target_ij | prefix) (mean per-token NLL, float64)
    and ``correct`` (B,) = (1/L_i) Σ_j [argmax logits at target_pos_ij == target_ij], the
    teacher-forced token accuracy.
    """
    dev = _device(model)
    logits = model(input_ids=enc.input_ids.to(dev), attention_mask=enc.attention_mask.to(dev),
                   position_ids=enc.position_ids.to(dev)).logits
    pos = enc.target_pos.to(dev)
    rows = torch.arange(pos.shape[0], device=dev)[:, None].expand_as(pos)
    sel = logits[rows, pos].double()  # (B, L, V): only the positions that predict targets
    logp = torch.log_softmax(sel, dim=-1)
    tgt = enc.target_ids.to(dev)
    m = enc.target_mask.to(dev)
    tok_logp = logp.gather(-1, tgt[..., None])[..., 0]
    n = m.sum(1).double()
    nll = -(tok_logp * m).sum(1) / n
    correct = ((sel.argmax(-1) == tgt) & m).sum(1).double() / n
    return nll.cpu(), correct.cpu()


def _batches(n: int, batch_size: int):
    if batch_size < 1:
        raise InputError(f"batch_size must be positive, got {batch_size}")
    for start in range(0, n, batch_size):
        yield slice(start, min(n, start + batch_size))


def target_scores(model, tokenizer, prompts: Sequence[str], targets: Sequence[str], *,
                  batch_size: int = 64, padding_side: str = "right", progress=None,
                  max_chunk_tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The scores of :func:`score_pairs` for any number of pairs, at most ``batch_size`` model
    inputs per forward.

    A pair's input is its prompt and its target without the last token (nothing reads the
    logits after it), and pairs with the same input share one row: the CounterFact and zsRE
    scores of one prompt against its new and its true object (one token each) cost one row, not
    two. Inputs run in order of length, so each forward pads little, and the scores come back in
    the input order; causal attention and real-token position ids make a row's logits those of
    the sequence alone. ``max_chunk_tokens`` also bounds a forward's padded tokens (rows ×
    longest row; a longer row runs alone), so memory does not grow with the number of pairs.
    Returns (nll, token_accuracy), each (n,) float64 on the CPU. ``progress`` is an optional
    tqdm bar advanced by the number of pairs scored.
    """
    from fastedit.editing.tokens import check_max_tokens, length_chunks

    check_max_tokens(max_chunk_tokens)
    if batch_size < 1:
        raise InputError(f"batch_size must be positive, got {batch_size}")
    if padding_side not in ("left", "right"):
        raise InputError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    p_ids, t_ids = _tokenize_pairs(tokenizer, prompts, targets)
    n = len(p_ids)
    nll = torch.zeros(n, dtype=torch.float64)
    acc = torch.zeros(n, dtype=torch.float64)
    if n == 0:
        return nll, acc
    row_of: dict[tuple, int] = {}
    seqs, pairs_of = [], []
    for i, (p, t) in enumerate(zip(p_ids, t_ids)):
        key = tuple(p + t[:-1])
        if key not in row_of:
            row_of[key] = len(seqs)
            seqs.append(key)
            pairs_of.append([])
        pairs_of[row_of[key]].append(i)
    if max_chunk_tokens is None:
        order = sorted(range(len(seqs)), key=lambda u: len(seqs[u]))
        batches = [order[sl] for sl in _batches(len(order), batch_size)]
    else:
        batches = [c[k:k + batch_size] for c in length_chunks([(0, len(x)) for x in seqs], max_chunk_tokens)
                   for k in range(0, len(c), batch_size)]
    dev = _device(model)
    with torch.no_grad():
        for rows in batches:
            ids, mask, offsets = _padded([seqs[u] for u in rows], _hf.pad_id(tokenizer), padding_side)
            logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev),
                           position_ids=_hf.position_ids(mask).to(dev)).logits
            b_idx, pos, tgt, pair = [], [], [], []
            for b, u in enumerate(rows):
                for i in pairs_of[u]:
                    start = offsets[b] + len(p_ids[i]) - 1
                    for j, tok in enumerate(t_ids[i]):
                        b_idx.append(b)
                        pos.append(start + j)
                        tgt.append(tok)
                        pair.append(i)
            sel = logits[torch.tensor(b_idx, device=dev), torch.tensor(pos, device=dev)].double()
            tgt_t = torch.tensor(tgt, device=dev)
            tok_logp = torch.log_softmax(sel, dim=-1).gather(-1, tgt_t[:, None])[:, 0].cpu()
            hit = (sel.argmax(-1) == tgt_t).double().cpu()
            pair_t = torch.tensor(pair)
            nll.index_add_(0, pair_t, -tok_logp)
            acc.index_add_(0, pair_t, hit)
            if progress is not None:
                progress.update(sum(len(pairs_of[u]) for u in rows))
    lengths = torch.tensor([len(t) for t in t_ids], dtype=torch.float64)
    return nll / lengths, acc / lengths


def _left_padded(tokenizer, prompts: Sequence[str]):
    ids, mask, _ = _padded(tokenizer(list(prompts))["input_ids"], _hf.pad_id(tokenizer), "left")
    return ids, mask


@torch.no_grad()
def next_token_argmax(model, tokenizer, prompts: Sequence[str], *, batch_size: int = 256) -> torch.Tensor:
    """argmax_v p(v | prompt) for each prompt: (n,) long, left-padded batches."""
    dev = _device(model)
    out = []
    for sl in _batches(len(prompts), batch_size):
        ids, mask = _left_padded(tokenizer, prompts[sl])
        pos = _hf.position_ids(mask)
        logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev), position_ids=pos.to(dev)).logits
        out.append(logits[:, -1].argmax(-1).cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


@torch.no_grad()
def greedy_generate(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 50,
                    batch_size: int = 32) -> list[str]:
    """Greedy continuations (prompt included) of each prompt, left-padded batches.

    One forward over the prompts, then one single-token forward per new token on the model's
    key/value cache, with the attention mask and position ids extended by hand so that left
    padding gives every row the positions it would have alone. A row stops at EOS.
    """
    dev = _device(model)
    eos, pad = tokenizer.eos_token_id, _hf.pad_id(tokenizer)
    cache_name = _hf.cache_argument(model)
    texts = []
    for sl in _batches(len(prompts), batch_size):
        ids, mask = _left_padded(tokenizer, prompts[sl])
        ids, mask = ids.to(dev), mask.to(dev)
        done = torch.zeros(ids.shape[0], dtype=torch.bool, device=dev)
        out = model(input_ids=ids, attention_mask=mask, position_ids=_hf.position_ids(mask),
                    use_cache=True)
        for step in range(max_new_tokens):
            nxt = torch.where(done, torch.full_like(done, pad, dtype=torch.long), out.logits[:, -1].argmax(-1))
            ids = torch.cat([ids, nxt[:, None]], 1)
            mask = torch.cat([mask, (~done).long()[:, None]], 1)
            if eos is not None:
                done |= nxt == eos
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=mask.sum(1, keepdim=True) - 1,
                        use_cache=True, **{cache_name: _hf.output_cache(out)})
        for row, m in zip(ids.cpu(), mask.cpu()):
            texts.append(tokenizer.decode(row[m.bool()].tolist(), skip_special_tokens=True))
    return texts
