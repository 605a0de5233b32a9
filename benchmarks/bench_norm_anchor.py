"""NAS norm anchoring and the δ clamp: fastedit (one kernel launch on CUDA, vectorised torch
on CPU) against the references' one-fact-at-a-time loop.

Memory-bound ops, so each entry reports GB/s from the bytes an ideal implementation moves:
norm_anchor reads v and writes scaled v, keep (1 B) and the norm (4 B) per row; clamp_norm
reads δ and the radius (4 B) and writes δ.

    pytest benchmarks/bench_norm_anchor.py --benchmark-enable     # CPU: 2000 x 1600 fp32
    (on a GPU: 2000 x 4096, the 2000-edit benchmark at Llama3/GPT-J width)
"""
import pytest
import torch

from baselines import clamp_norm_per_fact, norm_anchor_per_fact
from fastedit.linalg import clamp_norm, norm_anchor

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
N, D = (2000, 4096) if CUDA else (2000, 1600)
DTYPE = torch.float32


def _sync():
    if CUDA:
        torch.cuda.synchronize()


def _record(benchmark, what, nbytes):
    benchmark.extra_info.update(what=what, n=N, d=D, dtype=str(DTYPE), device=DEVICE)
    if CUDA:
        benchmark.extra_info["gpu"] = torch.cuda.get_device_name()
    stats = getattr(benchmark, "stats", None)
    if stats is not None:  # None under --benchmark-disable (a smoke run, nothing timed)
        benchmark.extra_info["GB/s"] = round(nbytes / stats.stats.mean / 1e9, 3)


@pytest.fixture(scope="module")
def values():
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(N, D, generator=gen) * (1 + torch.rand(N, 1, generator=gen))
    mu = float(v.norm(dim=-1).median()) / 1.5  # about a fifth of the rows are dropped
    return v.to(device=DEVICE, dtype=DTYPE), mu


def _anchor_bytes():
    return 2 * N * D * DTYPE.itemsize + N * (1 + 4)


def _clamp_bytes():
    return 2 * N * D * DTYPE.itemsize + N * 4


def test_fastedit_norm_anchor(benchmark, values):
    benchmark.group = "norm_anchor"
    v, mu = values

    def run():
        norm_anchor(v, mu)
        _sync()

    benchmark(run)
    _record(benchmark, "fastedit norm_anchor", _anchor_bytes())


def test_baseline_norm_anchor_per_fact(benchmark, values):
    benchmark.group = "norm_anchor"
    v, mu = values

    def run():
        norm_anchor_per_fact(v, mu)
        _sync()

    benchmark(run)
    _record(benchmark, "baseline: rescale one fact at a time", _anchor_bytes())


def test_fastedit_clamp_norm(benchmark, values):
    benchmark.group = "clamp_norm"
    v, mu = values
    radius = torch.full((N,), mu, device=DEVICE)

    def run():
        clamp_norm(v, radius)
        _sync()

    benchmark(run)
    _record(benchmark, "fastedit clamp_norm", _clamp_bytes())


def test_baseline_clamp_norm_per_fact(benchmark, values):
    benchmark.group = "clamp_norm"
    v, mu = values
    radius = torch.full((N,), mu, device=DEVICE)

    def run():
        clamp_norm_per_fact(v, radius)
        _sync()

    benchmark(run)
    _record(benchmark, "baseline: clamp one edit at a time", _clamp_bytes())
