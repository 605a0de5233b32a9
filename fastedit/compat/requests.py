"""Edit requests in the shapes the reference code and EasyEdit take.

- The MEMIT/AlphaEdit repositories: ``{"prompt": "{} plays the", "subject": "Toko Yasuda",
  "target_new": {"str": "piano"}, "case_id": ...}`` (CounterFact's ``requested_rewrite``).
- EasyEdit: the subject written inside the prompt, targets as plain strings::

      editor.edit(prompts=["Toko Yasuda plays the"], subject=["Toko Yasuda"], target_new=["piano"],
                  ground_truth=["guitar"], rephrase_prompts=[...],
                  locality_inputs={"neighborhood": {"prompt": [...], "ground_truth": [...]}})

  :func:`easyedit_records` turns those lists into fastedit's normalised records (evaluated as
  zsRE-style token accuracies by :func:`fastedit.eval.evaluate`), and :func:`to_request` takes
  one request dict of either shape.
"""
from __future__ import annotations

from fastedit.editing.requests import NO_TRUE_TARGET, Request
from fastedit.errors import InputError


def _text(t, what: str, where: str) -> str:
    if isinstance(t, dict) and "str" in t:
        t = t["str"]
    if not isinstance(t, str):
        raise InputError(f"{where}: {what} must be a string (or {{'str': ...}}), got {type(t).__name__}")
    return t


def templated(prompt: str, subject: str, where: str = "request") -> str:
    """``prompt`` with the subject's first occurrence replaced by ``{}`` (kept if it has ``{}``)."""
    if "{}" in prompt:
        return prompt
    if not subject or subject not in prompt:
        raise InputError(f"{where}: the subject {subject!r} does not occur in the prompt {prompt!r}; write the "
                         "subject inside the prompt (EasyEdit) or put '{}' where it goes (MEMIT/AlphaEdit)")
    return prompt.replace(subject, "{}", 1)


def to_request(d, index: int | None = None) -> Request:
    """A :class:`~fastedit.editing.Request` from a reference or EasyEdit request dict."""
    if isinstance(d, Request):
        return d
    where = "request" if index is None else f"request {index}"
    if not isinstance(d, dict):
        raise InputError(f"{where}: expected a dict, got {type(d).__name__}")
    if isinstance(d.get("requested_rewrite"), dict):
        d = {"case_id": d.get("case_id"), **d["requested_rewrite"]}
    for k in ("prompt", "subject", "target_new"):
        if k not in d:
            raise InputError(f"{where}: missing {k!r}; a request needs prompt, subject and target_new")
    subject = _text(d["subject"], "subject", where)
    true = d.get("target_true", d.get("ground_truth"))
    return Request(prompt=templated(_text(d["prompt"], "prompt", where), subject, where), subject=subject,
                   target_new=_text(d["target_new"], "target_new", where),
                   target_true=None if true is None else _text(true, "ground_truth", where),
                   case_id=d.get("case_id", index))


def _listed(x, n: int | None, name: str) -> list:
    if x is None:
        return [None] * (n or 0)
    xs = [x] if isinstance(x, str) else list(x)
    if n is not None and len(xs) != n:
        raise InputError(f"{name} has {len(xs)} entries but prompts has {n}; give one per prompt")
    return xs


def easyedit_records(prompts, target_new, subject, ground_truth=None, rephrase_prompts=None,
                     locality_inputs=None, portability_inputs=None) -> list[dict]:
    """fastedit's normalised records (format ``"zsre"``) from EasyEdit's ``edit(...)`` arguments.

    Each record's rewrite is prompt (subject → ``{}``) → target_new, its paraphrase the
    rephrase prompt, its neighbourhood prompts every ``locality_inputs[key]`` pair (prompt,
    ground_truth). ``portability_inputs`` has no fastedit metric and is refused when given.
    """
    if portability_inputs:
        raise InputError("portability_inputs: fastedit has no portability metric; leave it out")
    ps = _listed(prompts, None, "prompts")
    if not ps:
        raise InputError("prompts is empty")
    n = len(ps)
    tn, subj = _listed(target_new, n, "target_new"), _listed(subject, n, "subject")
    gt, reph = _listed(ground_truth, n, "ground_truth"), _listed(rephrase_prompts, n, "rephrase_prompts")
    loc = {}
    for key, item in (locality_inputs or {}).items():
        if not isinstance(item, dict) or "prompt" not in item or "ground_truth" not in item:
            raise InputError(f"locality_inputs[{key!r}] must be {{'prompt': [...], 'ground_truth': [...]}}")
        loc[key] = (_listed(item["prompt"], n, f"locality_inputs[{key!r}]['prompt']"),
                    _listed(item["ground_truth"], n, f"locality_inputs[{key!r}]['ground_truth']"))
    records = []
    for i in range(n):
        if subj[i] is None:
            raise InputError(f"request {i}: no subject; EasyEdit's MEMIT/AlphaEdit need subject=[...]")
        rr = to_request({"prompt": ps[i], "subject": subj[i], "target_new": tn[i], "ground_truth": gt[i]}, index=i)
        neigh = []
        for key, (lp, lg) in loc.items():
            if lp[i] is not None:
                neigh.append({"prompt": lp[i], "target": _text(lg[i], "ground_truth", f"locality {key!r}"),
                              "locality": key})
        records.append({"case_id": i, "format": "zsre",
                        "requested_rewrite": {"prompt": rr.prompt, "subject": rr.subject,
                                              "target_new": {"str": rr.target_new},
                                              "target_true": {"str": rr.target_true or NO_TRUE_TARGET}},
                        "paraphrase_prompts": [reph[i]] if reph[i] is not None else [],
                        "neighborhood_prompts": neigh})
    return records
