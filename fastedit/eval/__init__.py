"""Batched CounterFact and zsRE evaluation of (edited) causal language models.

    report = fastedit.eval.evaluate(model, tokenizer, records)

``records`` are raw CounterFact/zsRE records or the normalised ones of
:func:`fastedit.editing.requests.load_records`; the format decides the metrics.
"""
from __future__ import annotations

from typing import Sequence

from fastedit.errors import InputError
from fastedit.eval.consistency import Snippets, load_snippets
from fastedit.eval.counterfact import evaluate_counterfact
from fastedit.eval.fluency import mean_text_entropy, ngram_entropy, text_entropy
from fastedit.eval.zsre import evaluate_zsre

__all__ = ["evaluate", "evaluate_counterfact", "evaluate_zsre", "normalise", "load_snippets",
           "Snippets", "mean_text_entropy", "ngram_entropy", "text_entropy"]


def normalise(records: Sequence[dict]) -> list[dict]:
    """Records in the normalised shape: kept as they are when every one has a ``format``
    field (already loaded), otherwise passed through ``load_records``."""
    from fastedit.editing.requests import load_records

    if not isinstance(records, (list, tuple)) or len(records) == 0:
        raise InputError("records must be a non-empty list of CounterFact or zsRE records")
    if all(isinstance(r, dict) and r.get("format") in ("counterfact", "zsre") for r in records):
        if len({r["format"] for r in records}) > 1:
            raise InputError("records mix CounterFact and zsRE formats; evaluate them separately")
        return list(records)
    return load_records(list(records))


def evaluate(model, tokenizer, records: Sequence[dict], **kwargs) -> dict:
    """:func:`evaluate_counterfact` or :func:`evaluate_zsre`, chosen by the records' format.

    The report gets a ``format`` field. Keyword arguments go to the chosen function.
    """
    recs = normalise(records)
    fmt = recs[0]["format"]
    if fmt == "zsre":
        for k in ("fluency", "snippets", "max_new_tokens"):
            if kwargs.pop(k, None):
                raise InputError(f"{k} applies to CounterFact records only; these are zsRE records")
        report = evaluate_zsre(model, tokenizer, recs, **kwargs)
    else:
        report = evaluate_counterfact(model, tokenizer, recs, **kwargs)
    return {"format": fmt, **report}
