"""Edit requests and the record files they come from (CounterFact, zsRE).

A request asks the model to complete ``prompt.format(subject)`` with ``target_new``. Records
are kept whole (as dicts) for evaluation; :func:`requests_from_records` takes the rewrite out.

zsRE records (MEND's eval split) are normalised into the CounterFact shape, as the references
do: the rewrite prompt is ``src`` with the subject replaced by ``{}``, the new target is
``answers[0]`` (``alt`` is MEND's alternative prediction and may be empty), the paraphrase is
``rephrase`` and the neighbourhood prompt is the unrelated ``loc`` question with ``loc_ans``.
"""
from __future__ import annotations

import json
import pathlib
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from fastedit.errors import InputError

#: The target_true placeholder the references use for zsRE records, which have no true object.
NO_TRUE_TARGET = "<|endoftext|>"


@dataclass(frozen=True)
class Request:
    """One fact to write: ``prompt.format(subject)`` should be followed by ``target_new``.

    ``prompt`` holds ``{}`` exactly once, where the subject goes. Targets are scored and
    trained as ``" " + target`` (a leading space is stripped here, so both spellings work).
    """

    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None
    case_id: Any = None
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        object.__setattr__(self, "target_new", _strip_target(self.target_new))
        if self.target_true is not None:
            object.__setattr__(self, "target_true", _strip_target(self.target_true))

    @property
    def text(self) -> str:
        """The rewrite prompt with the subject filled in."""
        return self.prompt.replace("{}", self.subject)

    @classmethod
    def from_dict(cls, d: dict, *, index: int | None = None) -> "Request":
        """From a CounterFact ``requested_rewrite``-style dict (``target_*`` as str or {"str": ...}),
        or a whole CounterFact record (its ``requested_rewrite`` and ``case_id`` are taken)."""
        where = f"request {index}" if index is not None else "request"
        if isinstance(d, dict) and isinstance(d.get("requested_rewrite"), dict):
            d = {"case_id": d.get("case_id"), **d["requested_rewrite"]}
        if not isinstance(d, dict):
            raise InputError(f"{where}: expected a dict with prompt, subject, target_new; got {type(d).__name__}")
        missing = [k for k in ("prompt", "subject", "target_new") if k not in d]
        if missing:
            raise InputError(f"{where}: missing field(s) {', '.join(missing)}; a request needs "
                             "prompt (with '{}' for the subject), subject and target_new")
        tn, tt = d["target_new"], d.get("target_true")
        return cls(
            prompt=d["prompt"],
            subject=d["subject"],
            target_new=tn["str"] if isinstance(tn, dict) else tn,
            target_true=(tt["str"] if isinstance(tt, dict) else tt),
            case_id=d.get("case_id"),
        )


def _strip_target(t) -> str:
    if not isinstance(t, str):
        raise InputError(f"target must be a string, got {type(t).__name__}")
    return t[1:] if t.startswith(" ") else t


def validate_requests(requests: Sequence[Request], tokenizer=None, max_length: int | None = None) -> None:
    """Raise :class:`InputError` naming the first bad request and what to fix.

    Checks: ``{}`` exactly once in the prompt, the subject non-empty, targets non-empty, and
    (with a tokenizer) that prompt + target fits in ``max_length`` tokens (default: the
    tokenizer's ``model_max_length`` when it is a real limit).
    """
    if len(requests) == 0:
        raise InputError("no requests given: pass at least one Request")
    if tokenizer is not None and max_length is None:
        m = getattr(tokenizer, "model_max_length", None)
        max_length = m if isinstance(m, int) and m < 1_000_000 else None
    for i, r in enumerate(requests):
        if not isinstance(r, Request):
            raise InputError(f"request {i}: expected fastedit.editing.Request, got {type(r).__name__}; "
                             "use Request.from_dict or requests_from_records")
        where = f"request {i}" + (f" (case {r.case_id})" if r.case_id is not None else "")
        if r.prompt.count("{}") != 1:
            raise InputError(f"{where}: prompt {r.prompt!r} must contain '{{}}' exactly once, where the subject goes")
        if not r.subject.strip():
            raise InputError(f"{where}: empty subject")
        if not r.target_new.strip():
            raise InputError(f"{where}: empty target_new")
        if tokenizer is not None and max_length is not None:
            n = len(tokenizer(r.text + " " + r.target_new)["input_ids"])
            if n > max_length:
                raise InputError(f"{where}: prompt + target is {n} tokens, longer than the model's "
                                 f"limit of {max_length}; shorten the prompt")


def _read_json(path) -> Any:
    p = pathlib.Path(path)
    if not p.is_file():
        raise InputError(f"records file {str(p)!r} does not exist")
    text = p.read_text(encoding="utf-8")
    try:
        if p.suffix == ".jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"records file {str(p)!r} is not valid JSON: {exc}") from None


def _normalise_counterfact(rec: dict, i: int) -> dict:
    rr = rec.get("requested_rewrite")
    if not isinstance(rr, dict):
        raise InputError(f"CounterFact record {i}: missing 'requested_rewrite'")
    if isinstance(rr, dict) and "{}" not in rr.get("prompt", ""):
        raise InputError(f"CounterFact record {i}: rewrite prompt has no '{{}}' for the subject")
    out = dict(rec)
    out.setdefault("case_id", i)
    out.setdefault("paraphrase_prompts", [])
    out.setdefault("neighborhood_prompts", [])
    out["format"] = "counterfact"
    return out


def _normalise_zsre(rec: dict, i: int) -> dict:
    for k in ("subject", "src", "answers", "rephrase", "loc", "loc_ans"):
        if k not in rec:
            raise InputError(f"zsRE record {i}: missing field {k!r}")
    subject, src = rec["subject"], rec["src"]
    if subject not in src:
        raise InputError(f"zsRE record {i}: subject {subject!r} does not occur in src {src!r}")
    if not rec["answers"]:
        raise InputError(f"zsRE record {i}: 'answers' is empty")
    return {
        "case_id": rec.get("case_id", i),
        "format": "zsre",
        "requested_rewrite": {
            "prompt": src.replace(subject, "{}", 1),
            "subject": subject,
            "target_new": {"str": rec["answers"][0]},
            "target_true": {"str": NO_TRUE_TARGET},
        },
        "paraphrase_prompts": [rec["rephrase"]],
        "neighborhood_prompts": [{"prompt": rec["loc"], "target": rec["loc_ans"]}],
        "raw": rec,
    }


def detect_format(records: list) -> str:
    """'counterfact' or 'zsre', from the first record's fields."""
    if not records or not isinstance(records[0], dict):
        raise InputError("records must be a non-empty list of JSON objects")
    first = records[0]
    if "requested_rewrite" in first:
        return "counterfact"
    if "src" in first and "answers" in first:
        return "zsre"
    raise InputError("cannot tell the records' format: expected CounterFact records "
                     "('requested_rewrite') or zsRE records ('src', 'answers'); pass format=")


def load_records(source, format: str | None = None, limit: int | None = None) -> list[dict]:
    """Load CounterFact or zsRE records from a .json/.jsonl path (or take a list of dicts).

    Returns records in the CounterFact shape (see the module docstring), each with a
    ``format`` field. ``limit`` keeps the first N records.
    """
    records = source if isinstance(source, list) else _read_json(source)
    if isinstance(records, dict):
        records = [records]
    fmt = format or detect_format(records)
    if fmt not in ("counterfact", "zsre"):
        raise InputError(f"format must be 'counterfact' or 'zsre', got {fmt!r}")
    if limit is not None:
        records = records[:limit]
    norm = _normalise_counterfact if fmt == "counterfact" else _normalise_zsre
    return [norm(r, i) for i, r in enumerate(records)]


def requests_from_records(records: Iterable[dict]) -> list[Request]:
    """The rewrite request of each (normalised) record, keeping its case_id."""
    out = []
    for i, rec in enumerate(records):
        rr = dict(rec["requested_rewrite"])
        rr.setdefault("case_id", rec.get("case_id", i))
        out.append(Request.from_dict(rr, index=i))
    return out
