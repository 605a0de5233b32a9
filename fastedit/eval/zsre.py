"""zsRE metrics (MEND's split, as MEMIT evaluates it), batched.

For a prompt and its answer tokens a_1..a_L (teacher forced), the token accuracy is
    acc = (1/L) Σ_j [argmax_v p(v | prompt, a_<j) == a_j].
Per case: efficacy = acc of answers[0] after the rewrite prompt (src), generalization = acc
after the paraphrase (rephrase), specificity = acc of loc_ans after the unrelated loc
question. Aggregates are means over cases × 100.
"""
from __future__ import annotations

from typing import Sequence


from fastedit.errors import InputError
from fastedit.eval.scoring import target_scores

_RATES = (("rewrite", "efficacy"), ("paraphrase", "generalization"), ("neighborhood", "specificity"))


def evaluate_zsre(model, tokenizer, records: Sequence[dict], *, batch_size: int = 64,
                  padding_side: str = "right", progress: bool = True) -> dict:
    """zsRE token accuracies of ``model`` on normalised zsRE records (see module docstring).

    records: as returned by :func:`fastedit.editing.requests.load_records` for a zsRE file
    (rewrite prompt with "{}", paraphrase_prompts, neighborhood_prompts as {prompt, target}).
    Returns ``{"n_cases", "efficacy", "generalization", "specificity", "cases": [...]}``.
    """
    from tqdm.auto import tqdm

    if len(records) == 0:
        raise InputError("no records to evaluate")
    prompts, targets, where = [], [], []
    for i, rec in enumerate(records):
        rr = rec.get("requested_rewrite")
        if not isinstance(rr, dict):
            raise InputError(f"record {i}: no requested_rewrite; load zsRE files with "
                             "fastedit.editing.requests.load_records")
        new = rr["target_new"]["str"] if isinstance(rr["target_new"], dict) else rr["target_new"]
        items = [("rewrite", rr["prompt"].replace("{}", rr["subject"]), new)]
        items += [("paraphrase", p, new) for p in rec.get("paraphrase_prompts", [])]
        for n in rec.get("neighborhood_prompts", []):
            if not isinstance(n, dict) or "prompt" not in n or "target" not in n:
                raise InputError(f"record {i}: a zsRE neighbourhood prompt must be {{prompt, target}} "
                                 "(the loc question and loc_ans)")
            items.append(("neighborhood", n["prompt"], n["target"]))
        for kind, p, t in items:
            if not str(t).strip():
                raise InputError(f"record {i} (case {rec.get('case_id')}): empty {kind} answer")
            prompts.append(p)
            targets.append(t)
            where.append((i, kind))
    with tqdm(total=len(prompts), desc="zsRE", unit="prompt", disable=not progress) as bar:
        _, acc = target_scores(model, tokenizer, prompts, targets, batch_size=batch_size,
                               padding_side=padding_side, progress=bar)
    per = [{kind: [] for kind, _ in _RATES} for _ in records]
    for (i, kind), a in zip(where, acc.tolist()):
        per[i][kind].append(a)
    cases = []
    for i, rec in enumerate(records):
        case = {"case_id": rec.get("case_id", i)}
        for kind, name in _RATES:
            v = per[i][kind]
            case[name] = sum(v) / len(v) * 100 if v else None
        cases.append(case)
    report: dict = {"n_cases": len(records)}
    for _, name in _RATES:
        vals = [c[name] for c in cases if c[name] is not None]
        report[name] = sum(vals) / len(vals) if vals else float("nan")
    report["cases"] = cases
    return report
