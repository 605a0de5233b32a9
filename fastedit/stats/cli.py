"""``fastedit stats``: collect the covariance statistics of a model over a corpus into a cache.

    fastedit stats --model meta-llama/Meta-Llama-3-8B --layers 4,5,6,7,8 --corpus wikipedia \\
        --num-samples 100000 --dtype bfloat16 --cache-dir stats/

Interrupted runs resume from their last checkpoint when rerun with the same arguments.
Under ``torchrun`` each process reads its shard and rank 0 writes the files.
"""
from __future__ import annotations

import argparse
import os

import torch

from fastedit.loading import DTYPES, add_layout_argument, layer_list, load_model

def configure(parser: argparse.ArgumentParser) -> None:
    from fastedit.stats.collect import DEFAULT_CHECKPOINT_EVERY, DEFAULT_CHECKPOINT_SECONDS, DEFAULT_TOKEN_BUDGET

    parser.add_argument("--model", required=True, help="Hugging Face model name or local directory")
    parser.add_argument("--revision", default=None, help="model revision (branch, tag or commit)")
    parser.add_argument("--layers", required=True, type=layer_list, help="comma-separated layer indices, e.g. 4,5,6")
    parser.add_argument("--corpus", required=True,
                        help="a .txt (one document per line) or .jsonl file, or a dataset name: wikipedia, "
                             "wikitext or name:config (needs `pip install datasets`)")
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


def run(args: argparse.Namespace) -> int:
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
    model, tokenizer = load_model(args.model, device=device, dtype=args.dtype, revision=args.revision)
    cache_dir = args.cache_dir or default_cache_dir()
    stats = collect_stats(model, tokenizer, args.layers, args.corpus, cache_dir=cache_dir, model_name=args.model,
                          revision=args.revision, max_length=args.max_length, token_budget=args.token_budget,
                          num_samples=args.num_samples, seed=args.seed, checkpoint_every=args.checkpoint_every,
                          checkpoint_seconds=args.checkpoint_seconds,
                          overwrite=args.overwrite, progress=not args.no_progress, rewrite=args.rewrite,
                          layout=args.layout, text_field=args.text_field, split=args.split)
    if rank == 0:
        for layer, acc in stats.items():
            where = layer_path(stats_dir(cache_dir, args.model, acc.metadata["dataset"]), layer)
            print(f"layer {layer}: {acc.count} tokens, d_k={acc.d_k} -> {where}")
    return 0
