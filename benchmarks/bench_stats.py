"""The whole covariance pass in tokens/s: fastedit (one pass, all layers hooked) vs the faithful
baseline (one float32 pass per layer, float32 running sum), side by side in one group.

CPU (default, a CI smoke test): a small random Llama, 6 layers, layers 1-5 hooked, float32.
CUDA (when available): a random Llama3-8B-shaped model (hidden 4096, intermediate 14336,
GQA 32/8 heads, vocab 128256), only the first 9 layers instantiated, layers 4-8 hooked;
fastedit runs it in bf16, the baseline in float32 as the references do.

    python -m pytest benchmarks/bench_stats.py --benchmark-enable
"""
import pytest
import torch

from baselines import covariance_per_layer_fp32
from fastedit.models import get_adapter, tiny_model
from fastedit.stats import collect_stats
from fastedit.stats.batching import pack
from fastedit.testing import rel_error

CONFIGS = {
    "cpu": dict(model=dict(hidden_size=64, intermediate_size=176, num_hidden_layers=6, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=128, vocab_size=512),
                layers=[1, 2, 3, 4, 5], docs=16, min_len=40, max_len=128, token_budget=1024,
                dtype=torch.float32, rounds=3, tol=1e-5),
    "cuda": dict(model=dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=9, num_attention_heads=32,
                            num_key_value_heads=8, max_position_embeddings=8192, vocab_size=128256),
                 layers=[4, 5, 6, 7, 8], docs=40, min_len=512, max_len=1024, token_budget=16384,
                 dtype=torch.bfloat16, rounds=3, tol=5e-2),
}


@pytest.fixture(scope="module")
def setup(device):
    """Models, documents and the baseline's batches, built once for both sides of the group."""
    kind = device.type
    cfg = CONFIGS[kind]
    with device:  # initialise on the GPU directly: 3B random parameters are slow to fill on a CPU
        base = tiny_model("llama", dtype=torch.float32, **cfg["model"])
        fast = base if cfg["dtype"] == torch.float32 else tiny_model("llama", dtype=cfg["dtype"], **cfg["model"])
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(cfg["min_len"], cfg["max_len"] + 1, (cfg["docs"],), generator=gen).tolist()
    vocab = cfg["model"]["vocab_size"]
    docs = [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lengths]
    batches = [(b.input_ids.to(device), b.attention_mask.to(device)) for b in pack(docs, cfg["token_budget"])]
    return dict(kind=kind, cfg=cfg, base=base, fast=fast, docs=docs, batches=batches, tokens=sum(lengths),
                names=[get_adapter(base).rewrite_name(l) for l in cfg["layers"]], d_k=get_adapter(base).d_k)


@pytest.mark.parametrize("role", ["baseline", "fastedit"])
def test_covariance_pass(benchmark, setup, role, timed):
    cfg = setup["cfg"]
    if role == "baseline":  # one float32 pass per layer, float32 running sums
        def run():
            out = covariance_per_layer_fp32(setup["base"], setup["names"], setup["batches"], setup["d_k"])
            return [out[n] for n in setup["names"]]
    else:  # one pass, all layers hooked
        def run():
            stats = collect_stats(setup["fast"], None, cfg["layers"], setup["docs"], max_length=cfg["max_len"],
                                  token_budget=cfg["token_budget"], progress=False)
            return [(stats[l].sum, stats[l].count) for l in cfg["layers"]]

    benchmark.group = f"stats pass ({setup['kind']}, {len(cfg['layers'])} layers)"
    result = benchmark.pedantic(timed(run), rounds=cfg["rounds"], iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(role=role, op="covariance pass", tokens=setup["tokens"], layers=len(cfg["layers"]),
                                dtype=str(cfg["dtype"])[6:])
    # Both sides compute the same statistics: same token count, sums equal to the dtype's accuracy.
    reference = covariance_per_layer_fp32(setup["base"], setup["names"][-1:], setup["batches"], setup["d_k"])
    mom2, count = reference[setup["names"][-1]]
    total, n = result[-1]
    benchmark.extra_info["rel_error_vs_fp32_baseline"] = err = rel_error(total, mom2)
    assert n == count == setup["tokens"]
    assert err <= cfg["tol"]
