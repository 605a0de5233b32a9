"""``fastedit demo``: edit facts of the bundled testbed model and show what changed.

Loads the shipped testbed Llama (or GPT-2), gets its covariance statistics (computed once, then
cached), evaluates ``--n`` of its facts, rewrites them sequentially in batches of
``--batch-size`` (default AlphaEdit + BLUE + NAS with the ``testbed-<arch>`` preset), and prints
a before/after table of a few edited prompts, the CounterFact metrics before and after (one line
each on what they measure), the facts that did not flip, the weight-norm growth of the edited
layers and the time of each stage. The statistics, the context templates and the NAS anchors are
cached under ``$FASTEDIT_CACHE_DIR`` (default ``~/.cache/fastedit``), so a second run skips them.
"""
from __future__ import annotations

import json
import sys
import time

from fastedit.errors import InputError

N_SHOWN = 5

#: What each stage of the timer is, printed as the stage starts.
STAGES = {
    "load": "import transformers, load the testbed model and draw the facts",
    "stats": "covariance C0 of the edited layers' keys over the generic corpus (cached)",
    "eval before": "CounterFact metrics of the unedited model",
    "edit: prepare": "context templates, solvers (C0 factored), NAS anchors: v* on the unedited model (cached)",
    "edit: targets": "v*: the value each edit should write, optimised per batch",
    "edit: keys": "the keys of the edited prompts at each edited layer",
    "edit: residual": "the residual each edited layer must write",
    "edit: solve": "the closed-form update of each layer",
    "edit: apply": "writing the updates into the weights",
    "eval after": "CounterFact metrics of the edited model",
}


def configure(parser) -> None:
    from fastedit.editing.cli import choices_help
    from fastedit.editing.methods import METHODS, STRATEGIES
    from fastedit.loading import add_threads_argument

    parser.add_argument("--arch", default="llama", help="testbed model: llama (default), gpt2, or llama-2k (2000 subjects)")
    parser.add_argument("--n", type=int, default=100, help="number of facts to rewrite (default 100)")
    parser.add_argument("--batch-size", type=int, default=50,
                        help="edits per sequential batch (default 50: two batches for 100 facts)")
    parser.add_argument("--method", choices=METHODS, default="alphaedit", help=choices_help(METHODS, "alphaedit"))
    parser.add_argument("--strategy", choices=STRATEGIES, default="blue", help=choices_help(STRATEGIES, "blue"))
    parser.add_argument("--no-nas", action="store_true", help="do not rescale value vectors to the norm anchor")
    parser.add_argument("--seed", type=int, default=0, help="which facts are drawn (default 0)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--json", metavar="FILE", help="also write the metrics and the edit report here")
    add_threads_argument(parser)


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


def _table(head: tuple, rows: list) -> str:
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()
    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, rows)])


def _stage(name: str) -> float:
    print(f"[{name}] {STAGES[name]}", flush=True)
    return time.perf_counter()


def run(args) -> int:
    import torch

    from fastedit import presets, testbed
    from fastedit.loading import set_threads

    if args.arch not in testbed.ARCHS:
        raise InputError(f"--arch must be one of {', '.join(testbed.ARCHS)}, got {args.arch!r}")
    if args.n < 1 or args.batch_size < 1:
        raise InputError("--n and --batch-size must be positive integers")
    try:
        device = torch.device(args.device)
    except RuntimeError as exc:
        raise InputError(f"--device {args.device!r} is not a torch device: {exc}") from exc
    hparams = presets.get(f"testbed-{args.arch}", method=args.method, strategy=args.strategy)
    threads = set_threads(args.threads, device)
    if device.type == "cpu":
        print(f"CPU threads: {threads} (--threads N to choose)", flush=True)
    times = {}
    t = _stage("load")
    from fastedit._io import cache_root
    from fastedit.editing.editor import Editor
    from fastedit.editing.requests import load_records, requests_from_records
    from fastedit.eval import evaluate
    from fastedit.eval.cli import EXPLAIN

    model, tok = testbed.load(args.arch, device=device)
    records = load_records(testbed.records(args.n, seed=args.seed, arch=args.arch))
    times["load"] = time.perf_counter() - t

    t = _stage("stats")
    layers = sorted(set(hparams.layers) | set(hparams.boundary_layers))
    if not testbed.stats_cached(args.arch, layers=layers):
        print(f"computing the covariance statistics of the testbed {args.arch} over "
              f"{testbed.STATS_DOCS} generic documents (cached for the next run)...", flush=True)
    stats = testbed.stats(args.arch, model=model, tokenizer=tok, layers=layers, progress=True)
    times["stats"] = time.perf_counter() - t

    shown = records[:N_SHOWN]
    prompt_of = lambda r: r["requested_rewrite"]["prompt"].format(r["requested_rewrite"]["subject"])
    prompts = [prompt_of(r) for r in shown]
    t = _stage("eval before")
    before_top = _top1(model, tok, prompts, device)
    before = evaluate(model, tok, records, progress=True)
    times["eval before"] = time.perf_counter() - t

    editor = Editor(model, tok, method=args.method, strategy=args.strategy, nas=not args.no_nas,
                    hparams=hparams, stats=stats, progress=True, cache_dir=cache_root() / "nas_anchors")
    n_batches = -(-args.n // args.batch_size)
    config = f"{args.method} + {args.strategy}{'' if args.no_nas else ' + NAS'}"
    print(f"[edit] {config}, {args.n} facts in {n_batches} sequential batch(es) of up to {args.batch_size}; "
          "the stages:", flush=True)
    for name, what in STAGES.items():
        if name.startswith("edit: "):
            print(f"  {name[6:]}: {what}")
    report = editor.edit(requests_from_records(records), batch_size=args.batch_size)

    t = _stage("eval after")
    after_top = _top1(model, tok, prompts, device)
    after = evaluate(model, tok, records, progress=True)
    times["eval after"] = time.perf_counter() - t

    rows = [(p, r["requested_rewrite"]["target_true"]["str"], r["requested_rewrite"]["target_new"]["str"], b, a)
            for p, r, b, a in zip(prompts, shown, before_top, after_top)]
    print()
    print(_table(("prompt", "true", "new", "top-1 before", "top-1 after"), rows))
    print()
    metrics = ("efficacy", "generalization", "specificity", "score")
    print(f"{'metric':<16}{'before':>8}{'after':>8}")
    for m in metrics:
        print(f"{m:<16}{before[m]:>8.1f}{after[m]:>8.1f}")
    for m in metrics:
        print(f"  {m}: {EXPLAIN[m]}")

    dropped = {d["request"] for d in report.dropped}
    not_flipped = [(r["case_id"], prompt_of(r), r["requested_rewrite"]["target_new"]["str"],
                    "dropped by NAS" if i in dropped else "written")
                   for i, (r, c) in enumerate(zip(records, after["cases"]))
                   if c["efficacy"] is not None and c["efficacy"] < 100]
    print()
    if not_flipped:
        print(f"{len(not_flipped)} of {args.n} facts did not flip (the new object is still less likely "
              "than the true one on the rewrite prompt):")
        print(_table(("case", "prompt", "new", "edit"), not_flipped))
    else:
        print(f"every one of the {args.n} facts flipped")
    print()
    growth = [(str(l), f"{w['original']:.3f}", f"{w['current']:.3f}", f"x{w['growth']:.3f}")
              for l, w in report.weight_norms.items()]
    print("weight norm of the edited layers (Frobenius norm of the MLP output projection):")
    print(_table(("layer", "‖W0‖", "‖W‖ after", "growth"), growth))
    print()
    stages = {**{k: times[k] for k in ("load", "stats", "eval before")}, "edit: prepare": report.prepare_seconds,
              **{f"edit: {k}": v for k, v in report.times().items()}, "eval after": times["eval after"]}
    print("seconds per stage: " + ", ".join(f"{k} {v:.1f}" for k, v in stages.items())
          + f"; total {sum(stages.values()):.1f}")
    print(f"edited {report.n_edited} of {args.n} facts ({len(report.dropped)} dropped by NAS) "
          f"in {report.seconds:.1f} s")
    print("\nnext: the command-line walk-through in README.md (fastedit stats, edit, eval, ask on the testbed); "
          "`fastedit edit --help` edits your own model with a requests file.")
    if args.json:
        payload = {"before": {m: before[m] for m in metrics}, "after": {m: after[m] for m in metrics},
                   "examples": [dict(zip(("prompt", "true", "new", "before", "after"), r)) for r in rows],
                   "not_flipped": [dict(zip(("case_id", "prompt", "new", "edit"), r)) for r in not_flipped],
                   "threads": threads, "seconds": stages, "report": report.to_dict()}
        try:
            with open(args.json, "w") as f:
                json.dump(payload, f, indent=1, default=str)
        except OSError as exc:
            raise InputError(f"cannot write --json {args.json!r}: {exc}") from exc
    sys.stdout.flush()
    return 0
