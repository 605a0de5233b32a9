"""zsRE metrics (MEND's split, as MEMIT evaluates it), batched.

For a prompt and its answer tokens a_1..a_L (teacher forced), the token accuracy is
    acc = (1/L) Σ_j [argmax_v p(v | prompt, a_<j) == a_j].
Per case: efficacy = acc of answers[0] after the rewrite prompt (src), generalization = acc
after the paraphrase (rephrase), specificity = acc of loc_ans after the unrelated loc
question followed by "?" (MEND's loc questions have none; the references append it, so the
figure is comparable with the MEMIT/AlphaEdit/BLUE tables). Aggregates are means over cases × 100.

``mode="reference"`` reproduces the published evaluators instead (MEMIT's ``dsets/zsre.py`` and
AlphaEdit's ``experiments/py/eval_utils_zsre.py``), quirks included, so a number can be lined up
with a paper's table. Each answer token j is scored as its own prompt, the string
``prompt + decode(a_<j)``, re-tokenised, and its argmax compared with the first token of
``tok(decode(a_j))``. The quirks:

1. "llama" in ``model.config._name_or_path`` (lower-cased) switches two things: the answer's
   first token (BOS) is dropped from the rewrite target, the prefix strings get an extra " "
   before ``decode(a_<j)`` for j > 0, and the compared token is column 1 of the re-tokenised
   target (column 0 otherwise), i.e. after its BOS.
2. The loc answer is tokenised as ``tok(" " + loc_ans)`` *with* special tokens, so for a
   tokenizer that adds BOS (Llama 3, Mistral) BOS is scored as the first loc answer token (the
   model is asked to predict BOS after the question) and appears as text in the later prefixes;
   specificity is biased down by about 1/(L+1) per case. fastedit's own mode scores the answer
   tokens only.
3. Targets are compared by their first re-tokenised token: a decoded sub-word that re-tokenises
   into several tokens is judged on the first of them.
"""
from __future__ import annotations

from typing import Sequence


from fastedit import _hf
from fastedit.errors import InputError
from fastedit.eval.scoring import target_scores

_RATES = (("rewrite", "efficacy"), ("paraphrase", "generalization"), ("neighborhood", "specificity"))


def _loc_prompt(rec: dict, prompt: str) -> str:
    # MEND's records (load_records keeps them as "raw") ask "nq question: ..." without the "?".
    return prompt + "?" if isinstance(rec.get("raw"), dict) and not prompt.endswith("?") else prompt


def evaluate_zsre(model, tokenizer, records: Sequence[dict], *, batch_size: int = 64,
                  padding_side: str = "right", progress: bool = True, mode: str = "fastedit") -> dict:
    """zsRE token accuracies of ``model`` on normalised zsRE records (see module docstring).

    records: as returned by :func:`fastedit.editing.requests.load_records` for a zsRE file
    (rewrite prompt with "{}", paraphrase_prompts, neighborhood_prompts as {prompt, target}).
    mode: ``"fastedit"`` (teacher-forced token accuracy) or ``"reference"`` (the published
    evaluators' procedure and quirks, see the module docstring).
    Returns ``{"n_cases", "efficacy", "generalization", "specificity", "mode", "cases": [...]}``;
    each case also has ``rewrite_prompts_correct`` etc., the per-token 0/1 lists.
    """
    from tqdm.auto import tqdm

    if len(records) == 0:
        raise InputError("no records to evaluate")
    if mode not in ("fastedit", "reference"):
        raise InputError(f"mode must be 'fastedit' or 'reference', got {mode!r}")
    if mode == "reference":
        return _finish(records, _reference_scores(model, tokenizer, records, batch_size), "reference")
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
            items.append(("neighborhood", _loc_prompt(rec, n["prompt"]), n["target"]))
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
    return _finish(records, per, "fastedit")


def _finish(records, per: list, mode: str) -> dict:
    """Cases and aggregates from per[i][kind] = scores in [0, 1] (one per prompt or per token)."""
    cases = []
    for i, rec in enumerate(records):
        case = {"case_id": rec.get("case_id", i)}
        for kind, name in _RATES:
            v = per[i][kind]
            case[name] = sum(v) / len(v) * 100 if v else None
            if mode == "reference":
                case[f"{kind}_prompts_correct"] = [bool(x) for x in v]
        cases.append(case)
    report: dict = {"n_cases": len(records), "mode": mode}
    for _, name in _RATES:
        vals = [c[name] for c in cases if c[name] is not None]
        report[name] = sum(vals) / len(vals) if vals else float("nan")
    report["cases"] = cases
    return report


def _reference_scores(model, tok, records, batch_size: int) -> list:
    """per[i][kind] = the 0/1 list the published zsRE evaluator computes for record i."""
    from fastedit.eval.scoring import next_token_argmax

    llama = "llama" in (getattr(getattr(model, "config", None), "_name_or_path", "") or "").lower()
    prompts, targets, where = [], [], []
    for i, rec in enumerate(records):
        rr = rec["requested_rewrite"]
        new = rr["target_new"]["str"] if isinstance(rr["target_new"], dict) else rr["target_new"]
        target_tok = tok(" " + new)["input_ids"]
        if llama:
            target_tok = target_tok[1:]
        for kind, p in [("rewrite", rr["prompt"].replace("{}", rr["subject"]))] + \
                       [("paraphrase", q) for q in rec.get("paraphrase_prompts", [])]:
            for j in range(len(target_tok)):
                sep = " " if llama and j > 0 else ""
                prompts.append(p + sep + tok.decode(target_tok[:j]))
                targets.append(tok.decode(target_tok[j]))
                where.append((i, kind))
        raw = rec.get("raw") if isinstance(rec.get("raw"), dict) else None
        locs = [(raw["loc"], raw["loc_ans"])] if raw else [(n["prompt"], n["target"])
                                                         for n in rec.get("neighborhood_prompts", [])]
        for loc, ans in locs:
            ans_toks = tok(" " + ans)["input_ids"]
            for j in range(len(ans_toks)):
                prompts.append(loc + "?" + tok.decode(ans_toks[:j]))
                targets.append(tok.decode(ans_toks[j]))
                where.append((i, "neighborhood"))
    pred = next_token_argmax(model, tok, prompts, batch_size=batch_size).tolist()
    col = 1 if llama else 0
    pad = _hf.pad_id(tok)
    per = [{kind: [] for kind, _ in _RATES} for _ in records]
    for (i, kind), p, t in zip(where, pred, targets):
        ids = tok(t)["input_ids"]
        # the reference pads the batch of targets; a target shorter than the column reads the pad id
        want = ids[col] if len(ids) > col else pad
        per[i][kind].append(float(p == want))
    return per
