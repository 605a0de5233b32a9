"""``fastedit demo``: edit facts of the bundled testbed model and show what changed.

Loads the shipped testbed Llama (or GPT-2), gets its covariance statistics (computed once, then
cached), evaluates ``--n`` of its facts, rewrites them sequentially in batches of
``--batch-size`` (default AlphaEdit + BLUE + NAS with the ``testbed-<arch>`` preset), and prints
a before/after table of a few edited prompts, the CounterFact metrics before and after, and the
time of each stage.
"""
from __future__ import annotations

import json
import sys
import time

from fastedit.errors import InputError

N_SHOWN = 5


def configure(parser) -> None:
    parser.add_argument("--arch", default="llama", help="testbed model: llama (default) or gpt2")
    parser.add_argument("--n", type=int, default=100, help="number of facts to rewrite (default 100)")
    parser.add_argument("--batch-size", type=int, default=50,
                        help="edits per sequential batch (default 50: two batches for 100 facts)")
    parser.add_argument("--method", default="alphaedit", help="alphaedit (default) | memit | memit_seq")
    parser.add_argument("--strategy", default="blue", help="blue (default) | distribute")
    parser.add_argument("--no-nas", action="store_true", help="do not rescale value vectors to the norm anchor")
    parser.add_argument("--seed", type=int, default=0, help="which facts are drawn (default 0)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--json", metavar="FILE", help="also write the metrics and the edit report here")


def _top1(model, tok, prompts: list, device) -> list:
    """The model's greedy next word for each prompt (its first generated token, decoded)."""
    import torch

    out = []
    for p in prompts:
        ids = tok(p, return_tensors="pt").to(device)
        with torch.no_grad():
            logits = model(**ids).logits[0, -1]
        out.append(tok.decode([int(logits.argmax())]).strip())
    return out


def _table(rows: list) -> str:
    head = ("prompt", "true", "new", "top-1 before", "top-1 after")
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths))
    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, rows)])


def run(args) -> int:
    import torch

    from fastedit import presets, testbed
    from fastedit.editing.editor import Editor
    from fastedit.editing.requests import load_records, requests_from_records
    from fastedit.eval import evaluate

    if args.arch not in testbed.ARCHS:
        raise InputError(f"--arch must be one of {', '.join(testbed.ARCHS)}, got {args.arch!r}")
    if args.n < 1 or args.batch_size < 1:
        raise InputError("--n and --batch-size must be positive integers")
    try:
        device = torch.device(args.device)
    except RuntimeError as exc:
        raise InputError(f"--device {args.device!r} is not a torch device: {exc}") from exc
    hparams = presets.get(f"testbed-{args.arch}", method=args.method, strategy=args.strategy)
    times = {}
    t = time.perf_counter()
    model, tok = testbed.load(args.arch, device=device)
    records = load_records(testbed.records(args.n, seed=args.seed, arch=args.arch))
    times["load"] = time.perf_counter() - t

    t = time.perf_counter()
    layers = sorted(set(hparams.layers) | set(hparams.boundary_layers))
    if not testbed.stats_cached(args.arch, layers=layers):
        print(f"computing the covariance statistics of the testbed {args.arch} over "
              f"{testbed.STATS_DOCS} generic documents (cached for the next run)...", flush=True)
    stats = testbed.stats(args.arch, model=model, tokenizer=tok, layers=layers, progress=True)
    times["stats"] = time.perf_counter() - t

    shown = records[:N_SHOWN]
    prompts = [r["requested_rewrite"]["prompt"].format(r["requested_rewrite"]["subject"]) for r in shown]
    t = time.perf_counter()
    before_top = _top1(model, tok, prompts, device)
    before = evaluate(model, tok, records, progress=False)
    times["eval before"] = time.perf_counter() - t

    editor = Editor(model, tok, method=args.method, strategy=args.strategy, nas=not args.no_nas,
                    hparams=hparams, stats=stats, progress=True)
    n_batches = -(-args.n // args.batch_size)
    print(f"editing {args.n} facts with {args.method} + {args.strategy}{'' if args.no_nas else ' + NAS'} "
          f"in {n_batches} sequential batch(es) of up to {args.batch_size}...", flush=True)
    report = editor.edit(requests_from_records(records), batch_size=args.batch_size)

    t = time.perf_counter()
    after_top = _top1(model, tok, prompts, device)
    after = evaluate(model, tok, records, progress=False)
    times["eval after"] = time.perf_counter() - t

    rows = [(p, r["requested_rewrite"]["target_true"]["str"], r["requested_rewrite"]["target_new"]["str"], b, a)
            for p, r, b, a in zip(prompts, shown, before_top, after_top)]
    print()
    print(_table(rows))
    print()
    metrics = ("efficacy", "generalization", "specificity", "score")
    print(f"{'metric':<16}{'before':>8}{'after':>8}")
    for m in metrics:
        print(f"{m:<16}{before[m]:>8.1f}{after[m]:>8.1f}")
    print()
    stages = {**{k: times[k] for k in ("load", "stats", "eval before")}, "edit: prepare": report.prepare_seconds,
              **{f"edit: {k}": v for k, v in report.times().items()}, "eval after": times["eval after"]}
    print("seconds per stage: " + ", ".join(f"{k} {v:.1f}" for k, v in stages.items()))
    print(f"edited {report.n_edited} of {args.n} facts ({len(report.dropped)} dropped by NAS) "
          f"in {report.seconds:.1f} s")
    print("\nnext: `fastedit edit --help` edits your own model with a requests file; see README.md "
          "for the Python API (fastedit.Editor) and the benchmarks.")
    if args.json:
        payload = {"before": {m: before[m] for m in metrics}, "after": {m: after[m] for m in metrics},
                   "examples": [dict(zip(("prompt", "true", "new", "before", "after"), r)) for r in rows],
                   "seconds": stages, "report": report.to_dict()}
        try:
            with open(args.json, "w") as f:
                json.dump(payload, f, indent=1, default=str)
        except OSError as exc:
            raise InputError(f"cannot write --json {args.json!r}: {exc}") from exc
    sys.stdout.flush()
    return 0
