"""Fluency of generated text: the references' weighted n-gram entropy.

For one text, with p_n the relative frequencies of its word n-grams,
    H_n = -Σ p_n log2 p_n,    entropy(text) = mean(2/3 · H_2, 4/3 · H_3)
and the fluency of a set of texts is the mean of entropy(text). Repetitive (degenerate)
generations have low entropy. Words are split as NLTK's word tokenizer does for plain
English (runs of word characters, each punctuation mark on its own), approximated by a
regular expression so that no NLTK download is needed.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from typing import Iterable, Sequence

_WORD = re.compile(r"\w+|[^\w\s]")

NGRAM_ORDERS = (2, 3)
NGRAM_WEIGHTS = (2 / 3, 4 / 3)


def words(text: str) -> list[str]:
    """The word tokens of ``text`` (words and single punctuation marks)."""
    return _WORD.findall(text)


def ngram_entropy(tokens: Sequence[str], n: int) -> float:
    """H_n = -Σ p log2 p over the frequency distribution of the n-grams of ``tokens``.
    0.0 when there are fewer than n tokens (no n-grams: nothing is uncertain)."""
    counts = Counter(tuple(tokens[i: i + n]) for i in range(len(tokens) - n + 1))
    total = sum(counts.values())
    if total == 0:
        return 0.0
    return -sum(c / total * math.log2(c / total) for c in counts.values())


def text_entropy(text: str) -> float:
    """mean(2/3 · H_2, 4/3 · H_3) of one text's word n-grams."""
    toks = words(text)
    terms = [w * ngram_entropy(toks, n) for n, w in zip(NGRAM_ORDERS, NGRAM_WEIGHTS)]
    return sum(terms) / len(terms)


def mean_text_entropy(texts: Iterable[str]) -> float:
    """Mean :func:`text_entropy` over ``texts`` (NaN for no texts)."""
    vals = [text_entropy(t) for t in texts]
    return sum(vals) / len(vals) if vals else float("nan")
