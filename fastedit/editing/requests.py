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
        for name in ("prompt", "subject"):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise InputError(f"{name} must be a string, got {type(value).__name__} {value!r}")
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
        try:
            return cls(prompt=d["prompt"], subject=d["subject"], target_new=_target_str(d["target_new"], "target_new"),
                       target_true=_target_str(d.get("target_true"), "target_true"), case_id=d.get("case_id"))
        except InputError as exc:
            raise InputError(f"{where}: {exc}") from None


def _target_str(t, name: str):
    """A target given as a string or as CounterFact's ``{"str": ...}``."""
    if isinstance(t, dict):
        if "str" not in t:
            raise InputError(f"{name} is a dict without the 'str' field (fields: {', '.join(map(str, t))}); give "
                             f'the target as a string or as {{"str": "..."}}')
        t = t["str"]
    if t is not None and not isinstance(t, str):
        raise InputError(f"{name} must be a string, got {type(t).__name__} {t!r}")
    return t


def _strip_target(t) -> str:
    if not isinstance(t, str):
        raise InputError(f"target must be a string, got {type(t).__name__} {t!r}")
    return t[1:] if t.startswith(" ") else t


def validate_requests(requests: Sequence[Request], tokenizer=None, max_length: int | None = None) -> None:
    """Raise :class:`InputError` naming the first bad request and what to fix.

    Checks: ``{}`` exactly once in the prompt, the subject non-empty, targets non-empty, no two
    requests with the same prompt and subject but different targets (their keys are the same,
    so one edit cannot make both true: such a batch is refused, whichever order it is in; an
    exact repeat is allowed), and (with a tokenizer) that prompt + target fits in
    ``max_length`` tokens (default: the tokenizer's ``model_max_length`` when it is a real
    limit). :func:`check_context_fit` checks the same with the context prefixes v* adds.
    """
    if len(requests) == 0:
        raise InputError("no requests given: pass at least one Request")
    if tokenizer is not None and max_length is None:
        m = getattr(tokenizer, "model_max_length", None)
        max_length = m if isinstance(m, int) and m < 1_000_000 else None
    seen: dict = {}
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
        first = seen.setdefault((r.prompt, r.subject), (i, r.target_new))
        if first[1] != r.target_new:
            raise InputError(f"{where} and request {first[0]} both rewrite {r.text!r} (same prompt and subject, so "
                             f"the same key) but to different targets, {r.target_new!r} and {first[1]!r}; one edit "
                             "cannot make both true: keep one of them")
        if tokenizer is not None and max_length is not None:
            n = len(tokenizer(r.text + " " + r.target_new)["input_ids"])
            if n > max_length:
                raise InputError(f"{where}: prompt + target is {n} tokens, longer than the model's "
                                 f"limit of {max_length}; shorten the prompt")


def check_context_fit(requests: Sequence[Request], tokenizer, max_length: int | None, templates: Sequence[str]
                      ) -> None:
    """Raise :class:`InputError` naming the first request whose longest v* row does not fit in
    ``max_length`` tokens: a context template (``templates``, flat, each with ``{}`` where the
    prompt goes) around the prompt, followed by the target without its last token.

    Only requests within a few tokens of the limit (prompt + target + the longest prefix) are
    tokenized with every template, so the check stays cheap for long lists.
    """
    from fastedit.editing.tokens import fill_subject, target_ids

    if max_length is None or tokenizer is None:
        return
    prefix = max(len(tokenizer(t.replace("{}", ""), add_special_tokens=False)["input_ids"]) for t in templates)
    for i, r in enumerate(requests):
        tgt = target_ids(tokenizer, r.target_new)
        if len(tokenizer(r.text)["input_ids"]) + prefix + len(tgt) + 2 <= max_length:
            continue
        for t in templates:
            n = len(tokenizer(fill_subject(t.replace("{}", r.prompt, 1), r.subject)[0])["input_ids"]) + len(tgt) - 1
            if n > max_length:
                where = f"request {i}" + (f" (case {r.case_id})" if r.case_id is not None else "")
                raise InputError(f"{where}: with the context prefix {t.replace('{}', '').strip()!r} that v* adds, "
                                 f"prompt + target is {n} tokens, longer than the model's limit of {max_length}; "
                                 "shorten the prompt or the target (or lower hparams.context_length)")


def _read_json(path) -> Any:
    p = pathlib.Path(path)
    if not p.is_file():
        raise InputError(f"records file {str(p)!r} does not exist")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"records file {str(p)!r} is not UTF-8 text (byte {exc.start}: {exc.reason}); convert it "
                         "to UTF-8") from None
    try:
        if p.suffix == ".jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"records file {str(p)!r} is not valid JSON: {exc}") from None


def _normalise_counterfact(rec: dict, i: int) -> dict:
    if not isinstance(rec, dict):
        raise InputError(f"CounterFact record {i}: expected a JSON object, got {type(rec).__name__}")
    rr = rec.get("requested_rewrite")
    if not isinstance(rr, dict):
        raise InputError(f"CounterFact record {i}: missing 'requested_rewrite'")
    if not isinstance(rr.get("prompt", ""), str):
        raise InputError(f"CounterFact record {i}: the rewrite prompt must be a string, got "
                         f"{type(rr['prompt']).__name__}")
    if "{}" not in rr.get("prompt", ""):
        raise InputError(f"CounterFact record {i}: rewrite prompt has no '{{}}' for the subject")
    out = dict(rec)
    out.setdefault("case_id", i)
    out.setdefault("paraphrase_prompts", [])
    out.setdefault("neighborhood_prompts", [])
    out["format"] = "counterfact"
    return out


def _normalise_zsre(rec: dict, i: int) -> dict:
    if not isinstance(rec, dict):
        raise InputError(f"zsRE record {i}: expected a JSON object, got {type(rec).__name__}")
    for k in ("subject", "src", "answers", "rephrase", "loc", "loc_ans"):
        if k not in rec:
            raise InputError(f"zsRE record {i}: missing field {k!r}")
    for k in ("subject", "src", "rephrase", "loc", "loc_ans"):
        if not isinstance(rec[k], str):
            raise InputError(f"zsRE record {i}: field {k!r} must be a string, got {type(rec[k]).__name__}")
    # A string here would silently give its first character as the target.
    if not isinstance(rec["answers"], list) or not all(isinstance(a, str) for a in rec["answers"]):
        raise InputError(f"zsRE record {i}: 'answers' must be a list of strings, got {rec['answers']!r}")
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
    if not isinstance(records, list):
        raise InputError(f"records must be a JSON list of objects (or one object), got {type(records).__name__}")
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise InputError(f"limit must be a positive int, got {limit!r}")
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
        if not isinstance(rec, dict) or not isinstance(rec.get("requested_rewrite"), dict):
            raise InputError(f"record {i} has no 'requested_rewrite' object; load records with load_records")
        rr = dict(rec["requested_rewrite"])
        rr.setdefault("case_id", rec.get("case_id", i))
        out.append(Request.from_dict(rr, index=i))
    return out
