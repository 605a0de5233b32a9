"""``fastedit eval``: CounterFact / zsRE metrics of a model on a records file."""
from __future__ import annotations

import json
import pathlib
import sys

from fastedit.errors import InputError
from fastedit.loading import load_model


def configure(parser) -> None:
    parser.add_argument("--model", required=True,
                        help="a local Hugging Face model directory, or 'testbed' / 'testbed:gpt2' "
                             "for the bundled testbed model")
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
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    parser.add_argument("--out", default=None, help="write the full report (with per-case results) as JSON here")


def run(args) -> int:
    from fastedit.editing.requests import load_records
    from fastedit.eval import evaluate

    if args.limit is not None and args.limit < 1:
        raise InputError(f"--limit must be positive, got {args.limit}")
    records = load_records(args.records, format=args.format, limit=args.limit)
    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype)
    kwargs = dict(batch_size=args.batch_size, padding_side=args.padding_side)
    if records[0]["format"] == "counterfact":
        kwargs.update(fluency=args.fluency, snippets=args.snippets)
    elif args.fluency or args.snippets:
        raise InputError("--fluency and --snippets apply to CounterFact records only")
    report = evaluate(model, tokenizer, records, progress=sys.stderr.isatty(), **kwargs)
    summary = {k: v for k, v in report.items() if k != "cases"}
    print(json.dumps(summary, indent=1))
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(report, indent=1))
    return 0
