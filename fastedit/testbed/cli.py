"""``fastedit testbed``: write the synthetic world's records, or retrain the testbed model.

    fastedit testbed world --out records.json [--format zsre] [-n 500]
    fastedit testbed train --arch llama --seed 0 --steps 3000 --out DIR
"""
from __future__ import annotations

import json
import pathlib

from fastedit.errors import InputError
from fastedit.testbed import ARCHS


def configure(parser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    w = sub.add_parser("world", help="write CounterFact or zsRE records of facts the shipped model knows")
    w.add_argument("--out", required=True, help="output .json file")
    w.add_argument("--format", choices=("counterfact", "zsre"), default="counterfact")
    w.add_argument("-n", type=int, default=None, help="number of records (default: every known fact)")
    w.add_argument("--seed", type=int, default=0, help="seed of the sample of facts")
    w.add_argument("--arch", choices=ARCHS, default="llama",
                   help="only facts this shipped model knows")
    t = sub.add_parser("train", help="train a testbed model from a seed (deterministic on CPU)")
    t.add_argument("--arch", choices=ARCHS, default="llama")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the shipped model's)")
    t.add_argument("--batch-size", type=int, default=None)
    t.add_argument("--out", required=True, help="directory to write the model, tokenizer and known.json")
    t.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    t.add_argument("--threads", type=int, default=1,
                   help="CPU threads (1 by default: the shipped weights were made with one)")


def run(args) -> int:
    if args.action == "world":
        from fastedit.testbed import records

        recs = records(args.n, format=args.format, seed=args.seed, arch=args.arch)
        pathlib.Path(args.out).write_text(json.dumps(recs, indent=1))
        print(f"wrote {len(recs)} {args.format} records to {args.out}")
        return 0
    import torch

    from fastedit.testbed.train import DEFAULTS, train

    if args.threads < 1:
        raise InputError(f"--threads must be positive, got {args.threads}")
    torch.set_num_threads(args.threads)
    opts = dict(DEFAULTS[args.arch])
    if args.steps is not None:
        opts["steps"] = args.steps
    if args.batch_size is not None:
        opts["batch_size"] = args.batch_size
    train(args.arch, seed=args.seed, out=args.out, device=args.device, **opts)
    print(f"saved the {args.arch} testbed model to {args.out}")
    return 0
