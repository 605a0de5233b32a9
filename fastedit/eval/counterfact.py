"""CounterFact metrics (ROME/MEMIT), batched over all prompts of many cases.

Each prompt is scored by the mean per-token NLL of " " + target, teacher forced, for both the
new and the true object. Per case, with [·] the indicator:
    efficacy       = mean over rewrite prompts      [NLL(new) < NLL(true)]
    generalization = mean over paraphrase prompts   [NLL(new) < NLL(true)]
    specificity    = mean over neighbourhood prompts [NLL(true) < NLL(new)]
and the magnitudes efficacy_magnitude etc. = mean of p(new) - p(true) (specificity: p(true) -
p(new)) with p = exp(-NLL), and the reference's accuracies ``*_prompts_correct``: a prompt is
correct when every token of its expected target (new for rewrite and paraphrase prompts, true
for neighbourhood prompts) is the teacher-forced argmax, reported per case as 0/1 lists and
aggregated as rewrite_acc, paraphrase_acc, neighborhood_acc (MEMIT's summarize). Aggregates
are the means over cases (cases without prompts of a kind are left out of that mean) × 100,
and score = harmonic mean of the three rates.
Optionally fluency (n-gram entropy of greedy generations from generation_prompts) and
consistency (TF-IDF cosine of those generations with snippets about the new object), both
× 100 as in the papers' tables (GPT2-XL's fluency is about 620 on that scale).
"""
from __future__ import annotations

import math
from typing import Sequence


from fastedit.errors import InputError
from fastedit.eval import consistency as _consistency
from fastedit.eval.fluency import text_entropy
from fastedit.eval.scoring import greedy_generate, target_scores

KINDS = ("rewrite", "paraphrase", "neighborhood")
RATE = {"rewrite": "efficacy", "paraphrase": "generalization", "neighborhood": "specificity"}


def _prompts_of(rec: dict, i: int) -> dict[str, list[str]]:
    rr = rec.get("requested_rewrite")
    if not isinstance(rr, dict) or "prompt" not in rr or "subject" not in rr:
        raise InputError(f"record {i}: not a CounterFact record (no requested_rewrite with prompt and subject); "
                         "load files with fastedit.editing.requests.load_records")
    neigh = [p["prompt"] if isinstance(p, dict) else p for p in rec.get("neighborhood_prompts", [])]
    return {"rewrite": [rr["prompt"].replace("{}", rr["subject"])],
            "paraphrase": list(rec.get("paraphrase_prompts", [])),
            "neighborhood": neigh}


def _target(t) -> str:
    return t["str"] if isinstance(t, dict) else t


def harmonic_mean(values: Sequence[float]) -> float:
    """n / Σ 1/x (0 if any x is 0; NaN if any is NaN)."""
    if any(math.isnan(v) for v in values):
        return float("nan")
    if any(v <= 0 for v in values):
        return 0.0
    return len(values) / sum(1 / v for v in values)


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def evaluate_counterfact(model, tokenizer, records: Sequence[dict], *, batch_size: int = 64,
                         padding_side: str = "right", fluency: bool = False, snippets=None,
                         max_new_tokens: int = 50, progress: bool = True, mode: str = "fastedit") -> dict:
    """CounterFact metrics of ``model`` on normalised CounterFact records (see module docstring).

    records: as returned by :func:`fastedit.editing.requests.load_records`. ``batch_size`` is
    the number of (prompt, target) pairs per forward. ``snippets``: a
    :class:`fastedit.eval.consistency.Snippets` or the directory of the reference's snippet
    and idf files; consistency is computed when given (it implies generating).

    Returns ``{"n_cases", "efficacy", "generalization", "specificity", "score", ...
    "cases": [{"case_id", "efficacy", ..., "nll": {kind: [[nll_new, nll_true], ...]}}]}``.
    ``mode="reference"`` is accepted for symmetry with :func:`evaluate_zsre`: the published
    CounterFact evaluator scores the same way (checked case by case), so both modes agree.
    """
    from tqdm.auto import tqdm

    if len(records) == 0:
        raise InputError("no records to evaluate")
    if mode not in ("fastedit", "reference"):
        raise InputError(f"mode must be 'fastedit' or 'reference', got {mode!r}")
    if snippets is not None and not isinstance(snippets, _consistency.Snippets):
        snippets = _consistency.load_snippets(snippets)
    prompts, targets, where = [], [], []  # where[j] = (case index, kind, prompt index, is_new)
    for i, rec in enumerate(records):
        rr = rec["requested_rewrite"] if isinstance(rec.get("requested_rewrite"), dict) else {}
        by_kind = _prompts_of(rec, i)
        new, true = _target(rr.get("target_new", "")), _target(rr.get("target_true", ""))
        if not new.strip() or not true.strip():
            raise InputError(f"record {i} (case {rec.get('case_id')}): CounterFact needs non-empty "
                             "target_new and target_true")
        for kind, ps in by_kind.items():
            for k, p in enumerate(ps):
                for is_new, t in ((True, new), (False, true)):
                    prompts.append(p)
                    targets.append(t)
                    where.append((i, kind, k, is_new))
    with tqdm(total=len(prompts), desc="CounterFact", unit="prompt", disable=not progress) as bar:
        nll, acc = target_scores(model, tokenizer, prompts, targets, batch_size=batch_size,
                                 padding_side=padding_side, progress=bar)
    table = [{kind: {} for kind in KINDS} for _ in records]
    exact = [{kind: {} for kind in KINDS} for _ in records]
    for (i, kind, k, is_new), v, a in zip(where, nll.tolist(), acc.tolist()):
        table[i][kind].setdefault(k, [None, None])[0 if is_new else 1] = v
        if is_new == (kind != "neighborhood"):
            exact[i][kind][k] = a == 1.0

    cases = []
    for i, rec in enumerate(records):
        case = {"case_id": rec.get("case_id", i), "nll": {}}
        for kind in KINDS:
            pairs = [table[i][kind][k] for k in sorted(table[i][kind])]
            case["nll"][kind] = pairs
            case[f"{kind}_prompts_correct"] = [exact[i][kind][k] for k in sorted(exact[i][kind])]
            if not pairs:
                case[RATE[kind]] = case[RATE[kind] + "_magnitude"] = None
                continue
            sign = -1.0 if kind == "neighborhood" else 1.0
            case[RATE[kind]] = _mean([float(sign * (t - n) > 0) for n, t in pairs]) * 100
            case[RATE[kind] + "_magnitude"] = _mean([sign * (math.exp(-n) - math.exp(-t)) for n, t in pairs]) * 100
        cases.append(case)

    if fluency or snippets is not None:
        gen_prompts = [(i, p) for i, rec in enumerate(records) for p in rec.get("generation_prompts", [])]
        texts = greedy_generate(model, tokenizer, [p for _, p in gen_prompts], max_new_tokens=max_new_tokens,
                                batch_size=max(1, batch_size // 2)) if gen_prompts else []
        per_case: list[list[str]] = [[] for _ in records]
        for (i, _), t in zip(gen_prompts, texts):
            per_case[i].append(t)
        for i, (case, gens) in enumerate(zip(cases, per_case)):
            case["generations"] = gens
            case["fluency"] = _mean([text_entropy(t) for t in gens]) * 100 if gens else None
            if snippets is not None:
                rr = records[i]["requested_rewrite"]
                tid = rr["target_new"].get("id") if isinstance(rr["target_new"], dict) else None
                sim = snippets.consistency(gens, rr.get("relation_id"), tid) if gens and tid else None
                case["consistency"] = sim * 100 if sim is not None else None

    report: dict = {"n_cases": len(records), "mode": mode}
    for name in ("efficacy", "generalization", "specificity"):
        for suffix in ("", "_magnitude"):
            vals = [c[name + suffix] for c in cases if c[name + suffix] is not None]
            report[name + suffix] = _mean(vals)
    for kind in KINDS:
        vals = [_mean([float(x) for x in c[f"{kind}_prompts_correct"]]) * 100 for c in cases
                if c[f"{kind}_prompts_correct"]]
        report[f"{kind}_acc"] = _mean(vals)
    report["score"] = harmonic_mean([report["efficacy"], report["generalization"], report["specificity"]])
    for extra in ("fluency", "consistency"):
        vals = [c[extra] for c in cases if c.get(extra) is not None]
        if any(extra in c for c in cases):
            report[extra] = _mean(vals)
    report["cases"] = cases
    return report
