"""``fastedit stats``: collect the covariance statistics of a model over a corpus into a cache.

    fastedit stats --model meta-llama/Meta-Llama-3-8B --layers 4,5,6,7,8 --corpus wikipedia \\
        --num-samples 100000 --dtype bfloat16 --cache-dir stats/
    fastedit stats --model testbed --corpus testbed      # the bundled testbed model, its generic corpus

The model name, the corpus and the layers are checked before the model loads; ``--layers``
defaults to the layers the model's preset edits (both strategies).

Interrupted runs resume from their last checkpoint when rerun with the same arguments.
Under ``torchrun`` each process reads its shard and rank 0 writes the files.
"""
from __future__ import annotations

import argparse
import os

import torch

from fastedit.errors import InputError
from fastedit.loading import (DTYPES, add_layout_argument, add_threads_argument, check_corpus, check_model,
                              layer_list, load_model, resolve_corpus, set_threads)

def configure(parser: argparse.ArgumentParser) -> None:
    from fastedit.stats.collect import DEFAULT_CHECKPOINT_EVERY, DEFAULT_CHECKPOINT_SECONDS, DEFAULT_TOKEN_BUDGET

    parser.add_argument("--model", required=True,
                        help="Hugging Face model name, local directory, or 'testbed' / 'testbed:gpt2' (bundled)")
    parser.add_argument("--revision", default=None, help="model revision (branch, tag or commit)")
    parser.add_argument("--layers", type=layer_list, default=None,
                        help="comma-separated layer indices, e.g. 4,5,6 (default: the layers the model's "
                             "preset edits, when fastedit knows the model)")
    parser.add_argument("--corpus", required=True,
                        help="a .txt (one document per line) or .jsonl file, a dataset name: wikipedia, "
                             "wikitext or name:config (needs `pip install datasets`), or 'testbed' (the "
                             "testbed's generic texts, 1000 unless --num-samples)")
    parser.add_argument("--text-field", default="text", help="field holding the text in .jsonl/dataset records")
    parser.add_argument("--split", default="train", help="dataset split (default train)")
    parser.add_argument("--num-samples", type=int, default=None, help="documents to read (default all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the document selection (default 0)")
    parser.add_argument("--max-length", type=int, default=None,
                        help="truncate documents to this many tokens (default: the model's context length)")
    parser.add_argument("--token-budget", type=int, default=DEFAULT_TOKEN_BUDGET,
                        help=f"padded tokens per forward batch (default {DEFAULT_TOKEN_BUDGET})")
    parser.add_argument("--checkpoint-every", type=int, default=DEFAULT_CHECKPOINT_EVERY,
                        help=f"batches between checkpoints (default {DEFAULT_CHECKPOINT_EVERY})")
    parser.add_argument("--checkpoint-seconds", type=float, default=DEFAULT_CHECKPOINT_SECONDS,
                        help=f"most seconds between checkpoints (default {DEFAULT_CHECKPOINT_SECONDS:g})")
    parser.add_argument("--cache-dir", default=None,
                        help="statistics cache (default $FASTEDIT_CACHE_DIR/stats or ~/.cache/fastedit/stats)")
    parser.add_argument("--rewrite", default=None,
                        help="rewrite-module name template for unknown architectures, e.g. model.layers.{}.mlp.down_proj")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="dtype to load the model in (default: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--device", default=None, help="device, e.g. cuda, cuda:1, cpu (default: cuda if available)")
    parser.add_argument("--overwrite", action="store_true", help="recompute even if statistics are cached")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_layout_argument(parser)
    add_threads_argument(parser)


def default_layers(model: str) -> list[int]:
    """The layers the preset of ``model`` edits under either strategy (critical and boundary layers)."""
    from fastedit import presets
    from fastedit.editing.cli import guess_preset

    preset = guess_preset(model)
    if preset is None:
        raise InputError(f"pass --layers: fastedit has no preset for {model!r} to take the edited layers from "
                         f"(presets: {', '.join(presets.names())})")
    hp = presets.get(preset)
    return sorted(set(hp.layers) | set(hp.boundary_layers) | set(presets.get(preset, strategy="distribute").layers))


def run(args: argparse.Namespace) -> int:
    check_model(args.model)
    check_corpus(args.corpus)
    if args.layers is None:
        args.layers = default_layers(args.model)
    if not args.layers:
        raise InputError("--layers is empty; pass comma-separated layer indices such as 4,5,6")
    if args.num_samples is not None and args.num_samples < 1:
        raise InputError(f"--num-samples must be positive, got {args.num_samples}")
    started_group = _init_distributed()
    try:
        return _collect(args)
    finally:
        if started_group:
            torch.distributed.destroy_process_group()


def _init_distributed() -> bool:
    """Join the process group torchrun describes (WORLD_SIZE > 1); True if this call made it."""
    dist = torch.distributed
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available() or dist.is_initialized():
        return False
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return True


def _collect(args) -> int:
    from fastedit.stats.cache import default_cache_dir, layer_path, stats_dir
    from fastedit.stats.collect import collect_stats
    from fastedit.stats.distributed import world

    rank, _ = world()
    if args.device is not None:
        device = torch.device(args.device)
    elif torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", 0))
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    set_threads(args.threads, device)
    corpus, model_name, num_samples = resolve_corpus(args.corpus, args.model, args.num_samples)
    model, tokenizer = load_model(args.model, device=device, dtype=args.dtype, revision=args.revision)
    cache_dir = args.cache_dir or default_cache_dir()
    stats = collect_stats(model, tokenizer, args.layers, corpus, cache_dir=cache_dir, model_name=model_name,
                          revision=args.revision, max_length=args.max_length, token_budget=args.token_budget,
                          num_samples=num_samples, seed=args.seed, checkpoint_every=args.checkpoint_every,
                          checkpoint_seconds=args.checkpoint_seconds,
                          overwrite=args.overwrite, progress=not args.no_progress, rewrite=args.rewrite,
                          layout=args.layout, text_field=args.text_field, split=args.split)
    if rank == 0:
        for layer, acc in stats.items():
            where = layer_path(stats_dir(cache_dir, model_name, acc.metadata["dataset"]), layer)
            print(f"layer {layer}: {acc.count} tokens, d_k={acc.d_k} -> {where}")
        print(f"pass `--stats {where.parent}` to `fastedit edit`")
    return 0
