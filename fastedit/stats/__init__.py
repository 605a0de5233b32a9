"""The covariance statistics C0 = E[k kᵀ] over a corpus: one pass, cached, resumable.

    from fastedit.stats import collect_stats
    stats = collect_stats(model, tokenizer, [4, 5, 6, 7, 8], "wiki.jsonl", cache_dir="stats",
                          model_name="meta-llama/Meta-Llama-3-8B", num_samples=100_000)
    C0 = stats[4].mean()          # (d_k, d_k) float64, per-token mean

See :mod:`fastedit.stats.collect` (the pass), :mod:`fastedit.stats.corpus` (sources and the
seeded document selection), :mod:`fastedit.stats.cache` (files, metadata, resume, the
reference ``.npz`` reader) and :mod:`fastedit.stats.distributed` (sharding over ranks).
The command line is ``fastedit stats`` (:mod:`fastedit.stats.cli`).
"""
from fastedit.stats.cache import read_reference_npz
from fastedit.stats.collect import collect_stats, layer_covariance, load_stats
from fastedit.stats.corpus import open_corpus, select_documents

__all__ = ["collect_stats", "layer_covariance", "load_stats", "open_corpus", "read_reference_npz",
           "select_documents"]
