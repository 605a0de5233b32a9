"""``fastedit eval``: CounterFact / zsRE metrics of a model on a records file.

    fastedit eval --model edited/ --base testbed --records records.json --out eval.json

With ``--base`` (the unedited model) it prints the metrics before and after, and for each fact
whether the edit took (efficacy) before and after. The JSON written by ``--out`` is valid JSON:
a metric that cannot be computed is ``null``, and ``missing`` says why.
"""
from __future__ import annotations

import json
import math
import pathlib
import sys

from fastedit.errors import InputError
from fastedit.loading import add_threads_argument, check_model, load_model, set_threads

#: One line per metric (CounterFact and zsRE name them alike).
EXPLAIN = {
    "efficacy": "edited facts whose rewrite prompt now prefers the new object (CounterFact: P(new) > P(true); "
                "zsRE: token accuracy of the new answer)",
    "generalization": "the same on paraphrases of the rewrite prompt",
    "specificity": "prompts about other subjects (same relation) that still give their own answer",
    "score": "harmonic mean of efficacy, generalization and specificity",
    "fluency": "n-gram entropy of greedy generations from the generation prompts (higher: less repetitive)",
    "consistency": "tf-idf similarity of the generations to reference texts about the new object",
}

_WHY = {
    "efficacy": "no record has a rewrite prompt",
    "generalization": "no record has paraphrase prompts",
    "specificity": "no record has neighbourhood prompts",
    "score": "needs efficacy, generalization and specificity",
    "fluency": "no record has generation_prompts",
    "consistency": "no record has generations matching a snippet of its new object",
}


def configure(parser) -> None:
    parser.add_argument("--model", required=True,
                        help="the model to evaluate: a local Hugging Face model directory (e.g. what "
                             "`fastedit edit --out` wrote), a hub name, or 'testbed' / 'testbed:gpt2'")
    parser.add_argument("--base", default=None,
                        help="the unedited model as well, to show the metrics and each fact before and after")
    parser.add_argument("--records", required=True, help="CounterFact or zsRE records (.json or .jsonl)")
    parser.add_argument("--format", choices=("counterfact", "zsre"), default=None,
                        help="the records' format (default: detected from the first record)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate the first N records only")
    parser.add_argument("--batch-size", type=int, default=64, help="prompt + target pairs per forward")
    parser.add_argument("--padding-side", choices=("right", "left"), default="right")
    parser.add_argument("--fluency", action="store_true",
                        help="also generate from generation_prompts and report n-gram entropy (CounterFact)")
    parser.add_argument("--snippets", default=None,
                        help="directory with attribute_snippets.json, idf.npy, tfidf_vocab.json for consistency")
    parser.add_argument("--show", type=int, default=20, metavar="N",
                        help="print the per-fact results of the first N records (default 20; 0: none)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    parser.add_argument("--out", default=None, help="write the full report (with per-case results) as JSON here")
    add_threads_argument(parser)


def without_nan(report: dict) -> tuple[dict, dict]:
    """(``report`` with every NaN metric as None, {metric: why it is missing})."""
    missing = {}
    out = {}
    for k, v in report.items():
        if isinstance(v, float) and math.isnan(v):
            out[k] = None
            missing[k] = _WHY.get(k.removesuffix("_magnitude"), "not computable on these records")
        else:
            out[k] = v
    return out, missing


def _summary(after: dict, before: dict | None) -> str:
    names = [k for k, v in after.items() if k not in ("n_cases", "format", "cases", "missing")
             and (v is None or isinstance(v, (int, float))) and not k.endswith("_magnitude")]
    fmt = lambda v: "–" if v is None else f"{v:.1f}"
    cols = ("before", "after") if before is not None else ("value",)
    lines = [f"{'metric':<16}" + "".join(f"{c:>8}" for c in cols)]
    for k in names:
        vals = ([before.get(k)] if before is not None else []) + [after[k]]
        why = after.get("missing", {}).get(k)
        lines.append(f"{k:<16}" + "".join(f"{fmt(v):>8}" for v in vals) + (f"   ({why})" if why else ""))
    lines.append("")
    lines += [f"{k}: {EXPLAIN[k]}" for k in names if k in EXPLAIN]
    return "\n".join(lines)


def _cases(records: list, after: dict, before: dict | None, n: int) -> str:
    head = ["case", "prompt", "new", "efficacy", "generalization", "specificity"]
    fmt = lambda v: "–" if v is None else f"{v:.0f}"
    rows = []
    for i, (rec, a) in enumerate(zip(records[:n], after["cases"])):
        rr = rec["requested_rewrite"]
        b = before["cases"][i] if before is not None else None
        cell = lambda k: (f"{fmt(b.get(k))} -> " if b is not None else "") + fmt(a.get(k))
        rows.append([str(a["case_id"]), rr["prompt"].format(rr["subject"]), rr["target_new"]["str"],
                     cell("efficacy"), cell("generalization"), cell("specificity")])
    widths = [max(len(r[j]) for r in [head, *rows]) for j in range(len(head))]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths))
    tail = [f"... and {len(records) - n} more in --out"] if len(records) > n else []
    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, rows), *tail])


def run(args) -> int:
    from fastedit.editing.requests import load_records
    from fastedit.eval import evaluate

    if args.limit is not None and args.limit < 1:
        raise InputError(f"--limit must be positive, got {args.limit}")
    if args.show < 0:
        raise InputError(f"--show must be >= 0, got {args.show}")
    check_model(args.model)
    if args.base is not None:
        check_model(args.base)
    if not pathlib.Path(args.records).is_file():
        raise InputError(f"--records {args.records!r} is not a file")
    if args.out is not None and pathlib.Path(args.out).is_dir():
        raise InputError(f"--out {args.out!r} is a directory; pass a file name such as eval.json")
    records = load_records(args.records, format=args.format, limit=args.limit)
    kwargs = dict(batch_size=args.batch_size, padding_side=args.padding_side)
    if records[0]["format"] == "counterfact":
        if args.fluency and not any(r.get("generation_prompts") for r in records):
            print(f"fastedit eval: warning: --fluency: no record in {args.records} has generation_prompts, so "
                  "fluency cannot be measured; it is reported as missing", file=sys.stderr)
        kwargs.update(fluency=args.fluency, snippets=args.snippets)
    elif args.fluency or args.snippets:
        raise InputError("--fluency and --snippets apply to CounterFact records only")
    set_threads(args.threads, args.device)
    progress = sys.stderr.isatty()

    def measure(name):
        model, tokenizer = load_model(name, device=args.device, dtype=args.dtype)
        report, missing = without_nan(evaluate(model, tokenizer, records, progress=progress, **kwargs))
        return {**report, "missing": missing}

    before = measure(args.base) if args.base is not None else None
    after = measure(args.model)
    print(f"{len(records)} {records[0]['format']} records, model {args.model}"
          + (f" against the unedited {args.base}" if before is not None else ""))
    print(_summary(after, before))
    if args.show:
        print()
        print(_cases(records, after, before, args.show))
    if args.out:
        payload = {**after, "before": before} if before is not None else after
        try:
            pathlib.Path(args.out).write_text(json.dumps(payload, indent=1, allow_nan=False))
        except OSError as exc:
            raise InputError(f"cannot write --out {args.out!r}: {exc}") from exc
    return 0
