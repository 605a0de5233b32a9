"""``fastedit edit``: edit a model with a requests file, save it and a JSON report.

    fastedit edit --model meta-llama/Meta-Llama-3-8B --requests counterfact.json \\
        --stats stats/meta-llama_Meta-Llama-3-8B/wikipedia_20220301.en_train --out edited/
    fastedit edit --model testbed --requests records.json --corpus testbed --out edited/

The defaults are the demo's: AlphaEdit + BLUE + NAS, batches of 100, the preset guessed from the
model name. ``--stats`` is the directory holding ``layer_<l>.safetensors`` for every edited layer
(what ``fastedit stats`` writes); with ``--corpus`` instead, the statistics are collected first
(cached, so a second run reads them). Everything that can be checked without the model (files,
preset, statistics of each edited layer) is checked before it loads. The output directory gets
the edited model and tokenizer (``save_pretrained``) and ``edit_report.json``.
"""
from __future__ import annotations

import argparse
import pathlib

from fastedit.editing.hparams import VSTAR_AUTOCAST
from fastedit.editing.methods import METHODS, REGULARIZERS, STRATEGIES
from fastedit.errors import FastEditError, InputError
from fastedit.loading import (DTYPES, add_layout_argument, add_threads_argument, check_corpus, check_model,
                              layer_list, load_model, resolve_corpus, set_threads, testbed_arch)

# One line per registered name for --help; a name registered without one is still offered.
_HELP = {
    "alphaedit": "MEMIT's update projected onto the null space of C0 and of earlier batches' keys",
    "memit": "closed-form least squares against λC0, each batch on its own",
    "memit_seq": "MEMIT whose covariance also grows by the keys of every earlier batch",
    "distribute": "spread the residual over all critical layers (MEMIT's loop)",
    "blue": "write only the first and last critical layer, each with its own residual",
    "rect": "keep only each ΔW's largest relative changes",
    "prune": "restrain the large singular values of the total update after the run",
}


def choices_help(names, default=None) -> str:
    """``name: what it does`` for each registered name (the registries in fastedit.editing.methods)."""
    parts = [f"{n}{' (default)' if n == default else ''}: {_HELP[n]}" if n in _HELP else str(n) for n in names]
    return "; ".join(parts)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="Hugging Face model name, local directory, or 'testbed' / 'testbed:gpt2' (bundled)")
    parser.add_argument("--requests", required=True, help="CounterFact or zsRE records (.json / .jsonl); "
                        "`fastedit testbed world --out FILE -n 100` writes some for the testbed")
    parser.add_argument("--format", choices=["counterfact", "zsre"], default=None,
                        help="records format (default: detected from the first record)")
    parser.add_argument("--limit", type=int, default=None, help="edit only the first N records")
    parser.add_argument("--method", choices=METHODS, default="alphaedit", help=choices_help(METHODS, "alphaedit"))
    parser.add_argument("--strategy", choices=STRATEGIES, default="blue", help=choices_help(STRATEGIES, "blue"))
    parser.add_argument("--nas", action=argparse.BooleanOptionalAction, default=True,
                        help="norm-anchor scaling of the value vectors (default on; --no-nas turns it off)")
    regs = [r for r in REGULARIZERS if r is not None]
    parser.add_argument("--regularizer", choices=regs, default=None, help=choices_help(regs) + " (default none)")
    parser.add_argument("--batch-size", type=int, default=100, help="edits per sequential batch (default 100)")
    parser.add_argument("--max-chunk-tokens", type=int, default=None, metavar="N",
                        help="memory budget of a batch's v*, key pass and residual reads: at most N padded token "
                             "positions per chunk (default: from the device's free memory, 128 MiB on the CPU); "
                             "lower it if a large batch runs out of memory. Results do not change")
    parser.add_argument("--vstar-checkpoint", action="store_true",
                        help="recompute the blocks v* replays in its backward pass instead of keeping their "
                             "activations: less memory per chunk, about a third more v* compute, same results")
    parser.add_argument("--preset", default=None, help="hyperparameter preset (default: from the model name)")
    parser.add_argument("--layers", type=layer_list, default=None, help="override the preset's critical layers")
    parser.add_argument("--vstar-autocast", choices=VSTAR_AUTOCAST, default=None,
                        help="run v*'s upper blocks and LM head under torch.autocast in this dtype (δ and Adam "
                             "stay float32): faster on GPUs for a float32 model, δ at bfloat16 precision (default off)")
    parser.add_argument("--stats", default=None, help="directory with layer_<l>.safetensors from `fastedit stats`")
    parser.add_argument("--corpus", default=None,
                        help="without --stats: collect the statistics over this corpus first (file, dataset "
                             "name, or 'testbed'; the default for --model testbed)")
    parser.add_argument("--num-samples", type=int, default=None, help="with --corpus: documents to read")
    parser.add_argument("--cache-dir", default=None,
                        help="statistics cache (with --corpus; default $FASTEDIT_CACHE_DIR/stats); the NAS "
                             "anchors go to its nas_anchors/ (default $FASTEDIT_CACHE_DIR/nas_anchors)")
    parser.add_argument("--out", required=True, help="output directory for the edited model and edit_report.json")
    parser.add_argument("--device", default=None, help="device, e.g. cuda, cpu (default: cuda if available)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="load dtype (default bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_layout_argument(parser)
    add_threads_argument(parser)


def guess_preset(model_name: str) -> str | None:
    """The preset whose name matches a known model id (``gpt2-xl``, ``gpt-j-6b``, ``llama-3-8b``,
    ``testbed`` / ``testbed:gpt2``)."""
    arch = testbed_arch(model_name)
    if arch is not None:
        return f"testbed-{arch}"
    name = model_name.lower().replace("_", "-")
    if "gpt2-xl" in name:
        return "gpt2-xl"
    if "gpt-j-6b" in name or "gptj-6b" in name:
        return "gpt-j-6b"
    if ("llama-3" in name or "llama3" in name) and "8b" in name:
        return "llama3-8b"
    return None


def check_stats_dir(directory: str, layers) -> None:
    """Fail before the model loads unless ``directory`` holds finished statistics of every layer
    (fastedit's, checked by :func:`fastedit.stats.cache.check_directory`, or the references'
    ``.npz`` files, read by :class:`fastedit.stats.reference.ReferenceStats`)."""
    from fastedit.stats.cache import check_directory
    from fastedit.stats.reference import is_reference_dir

    if is_reference_dir(directory):
        return
    try:
        check_directory(directory, layers)
    except FastEditError as exc:
        raise InputError(f"--stats {directory!r}: {exc}") from None


def _check_args(args) -> None:
    check_model(args.model)
    if not pathlib.Path(args.requests).is_file():
        raise InputError(f"--requests {args.requests!r} is not a file")
    if args.batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.limit is not None and args.limit < 1:
        raise InputError(f"--limit must be >= 1, got {args.limit}")
    if args.max_chunk_tokens is not None and args.max_chunk_tokens < 1:
        raise InputError(f"--max-chunk-tokens must be a positive number of token positions, got "
                         f"{args.max_chunk_tokens} (leave it out for the default budget)")
    if args.stats is None and args.corpus is None:
        if testbed_arch(args.model) is None:
            raise InputError("the edit needs the covariance statistics of the edited layers: pass --stats DIR "
                             "(made by `fastedit stats --model M --layers L --corpus C`) or --corpus C to "
                             "collect them now")
        args.corpus = "testbed"
    if args.stats is not None and args.corpus is not None:
        raise InputError("pass either --stats DIR or --corpus C, not both")
    if args.corpus is not None:
        check_corpus(args.corpus)
    out = pathlib.Path(args.out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {args.out!r} exists and is not a directory")


def run(args: argparse.Namespace) -> int:
    from fastedit import presets
    from fastedit._io import cache_root
    from fastedit.editing.editor import Editor
    from fastedit.editing.methods import edited_layers
    from fastedit.editing.requests import load_records, requests_from_records

    _check_args(args)
    preset = args.preset or guess_preset(args.model)
    if preset is None:
        raise InputError(f"no preset known for {args.model!r}: pass --preset (one of {', '.join(presets.names())})")
    hparams = presets.get(preset, method=args.method, strategy=args.strategy)
    if args.layers:
        hparams = hparams.replace(layers=tuple(args.layers), blue_layers=None)
    if args.vstar_autocast:
        hparams = hparams.replace(vstar_autocast=args.vstar_autocast)
    if args.max_chunk_tokens is not None or args.vstar_checkpoint:
        hparams = hparams.replace(max_chunk_tokens=args.max_chunk_tokens or hparams.max_chunk_tokens,
                                  vstar_checkpoint=args.vstar_checkpoint or hparams.vstar_checkpoint)
    layers = list(edited_layers(args.strategy, hparams))
    if args.stats is not None:
        check_stats_dir(args.stats, layers)
    requests = requests_from_records(load_records(args.requests, format=args.format, limit=args.limit))
    set_threads(args.threads, args.device)

    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype)

    if args.stats is not None:
        stats = args.stats
    else:
        from fastedit.stats import collect_stats
        from fastedit.stats.cache import default_cache_dir

        corpus, model_name, num_samples = resolve_corpus(args.corpus, args.model, args.num_samples)
        stats = collect_stats(model, tokenizer, layers, corpus, cache_dir=args.cache_dir or default_cache_dir(),
                              model_name=model_name,
                              num_samples=num_samples, progress=not args.no_progress, layout=args.layout)
    anchors = (pathlib.Path(args.cache_dir) if args.cache_dir else cache_root()) / "nas_anchors"
    editor = Editor(model, tokenizer, method=args.method, strategy=args.strategy, nas=args.nas,
                    regularizer=args.regularizer, hparams=hparams, stats=stats, progress=not args.no_progress,
                    cache_dir=anchors, layout=args.layout)
    report = editor.edit(requests, batch_size=args.batch_size)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "edit_report.json").write_text(report.to_json(indent=1))
    d = report.to_dict()
    config = f"{args.method} + {args.strategy}{' + NAS' if args.nas else ''}"
    print(f"edited {d['n_edited']} of {len(requests)} requests ({d['n_dropped']} dropped by NAS) in "
          f"{d['seconds']:.1f}s ({d['prepare_seconds']:.1f}s of it preparing) with {config}; saved to {out}")
    growth = ", ".join(f"layer {l} x{w['growth']:.3f}" for l, w in report.weight_norms.items()
                       if w["growth"] is not None)
    print(f"weight norm ‖W‖/‖W0‖ of the edited layers: {growth}")
    return 0
