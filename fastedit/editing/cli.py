"""``fastedit edit``: edit a model with a requests file, save it and a JSON report.

    fastedit edit --model meta-llama/Meta-Llama-3-8B --preset llama3-8b \\
        --requests counterfact.json --method alphaedit --strategy blue --nas \\
        --batch-size 100 --stats stats/meta-llama_Meta-Llama-3-8B/wikipedia_20220301.en_train \\
        --out edited/

``--stats`` is the directory holding ``layer_<l>.safetensors`` for every edited layer (what
``fastedit stats`` writes); with ``--corpus`` instead, the statistics are collected first (and
cached under ``--cache-dir``). The output directory gets the edited model and tokenizer
(``save_pretrained``) and ``edit_report.json``.
"""
from __future__ import annotations

import argparse
import pathlib


from fastedit.errors import InputError
from fastedit.loading import DTYPES, add_layout_argument, layer_list, load_model

def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="Hugging Face model name or local directory")
    parser.add_argument("--requests", required=True, help="CounterFact or zsRE records (.json / .jsonl)")
    parser.add_argument("--format", choices=["counterfact", "zsre"], default=None,
                        help="records format (default: detected from the first record)")
    parser.add_argument("--limit", type=int, default=None, help="edit only the first N records")
    parser.add_argument("--method", choices=["alphaedit", "memit", "memit_seq"], default="alphaedit")
    parser.add_argument("--strategy", choices=["distribute", "blue"], default="distribute")
    parser.add_argument("--nas", action="store_true", help="norm-anchor scaling of the value vectors")
    parser.add_argument("--regularizer", choices=["rect", "prune"], default=None)
    parser.add_argument("--batch-size", type=int, default=100, help="edits per sequential batch (default 100)")
    parser.add_argument("--preset", default=None, help="hyperparameter preset (default: from the model name)")
    parser.add_argument("--layers", type=layer_list, default=None, help="override the preset's critical layers")
    parser.add_argument("--stats", default=None, help="directory with layer_<l>.safetensors from `fastedit stats`")
    parser.add_argument("--corpus", default=None,
                        help="without --stats: collect the statistics over this corpus first (file or dataset name)")
    parser.add_argument("--num-samples", type=int, default=None, help="with --corpus: documents to read")
    parser.add_argument("--cache-dir", default=None, help="cache for statistics (with --corpus) and NAS anchors")
    parser.add_argument("--out", required=True, help="output directory for the edited model and edit_report.json")
    parser.add_argument("--device", default=None, help="device, e.g. cuda, cpu (default: cuda if available)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="load dtype (default bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_layout_argument(parser)


def guess_preset(model_name: str) -> str | None:
    """The preset whose name matches a known model id (``gpt2-xl``, ``gpt-j-6b``, ``llama-3-8b``)."""
    name = model_name.lower().replace("_", "-")
    if "gpt2-xl" in name:
        return "gpt2-xl"
    if "gpt-j-6b" in name or "gptj-6b" in name:
        return "gpt-j-6b"
    if ("llama-3" in name or "llama3" in name) and "8b" in name:
        return "llama3-8b"
    return None


def _check_args(args) -> None:
    if not pathlib.Path(args.requests).is_file():
        raise InputError(f"--requests {args.requests!r} is not a file")
    if args.batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.limit is not None and args.limit < 1:
        raise InputError(f"--limit must be >= 1, got {args.limit}")
    if args.stats is not None and not pathlib.Path(args.stats).is_dir():
        raise InputError(f"--stats {args.stats!r} is not a directory; pass the directory holding "
                         "layer_<l>.safetensors written by `fastedit stats`")
    if args.stats is None and args.corpus is None:
        raise InputError("the edit needs the covariance statistics of the edited layers: pass --stats DIR "
                         "(made by `fastedit stats --model M --layers L --corpus C`) or --corpus C to "
                         "collect them now")
    out = pathlib.Path(args.out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {args.out!r} exists and is not a directory")


def run(args: argparse.Namespace) -> int:

    from fastedit import presets
    from fastedit.editing.editor import Editor
    from fastedit.editing.requests import load_records, requests_from_records

    _check_args(args)
    preset = args.preset or guess_preset(args.model)
    if preset is None:
        raise InputError(f"no preset known for {args.model!r}: pass --preset (one of {', '.join(presets.names())})")
    hparams = presets.get(preset, method=args.method, strategy=args.strategy)
    if args.layers:
        hparams = hparams.replace(layers=tuple(args.layers), blue_layers=None)
    requests = requests_from_records(load_records(args.requests, format=args.format, limit=args.limit))

    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype)

    if args.stats is not None:
        stats = args.stats
    else:
        from fastedit.editing.methods import edited_layers
        from fastedit.stats import collect_stats

        stats = collect_stats(model, tokenizer, list(edited_layers(args.strategy, hparams)), args.corpus,
                              cache_dir=args.cache_dir, model_name=args.model if args.cache_dir else None,
                              num_samples=args.num_samples, progress=not args.no_progress, layout=args.layout)
    editor = Editor(model, tokenizer, method=args.method, strategy=args.strategy, nas=args.nas,
                    regularizer=args.regularizer, hparams=hparams, stats=stats, progress=not args.no_progress,
                    cache_dir=args.cache_dir, layout=args.layout)
    report = editor.edit(requests, batch_size=args.batch_size)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "edit_report.json").write_text(report.to_json(indent=1))
    d = report.to_dict()
    print(f"edited {d['n_edited']} of {len(requests)} requests ({d['n_dropped']} dropped by NAS) in "
          f"{d['seconds']:.1f}s with {args.method}/{args.strategy}; saved to {out}")
    return 0
