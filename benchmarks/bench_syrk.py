"""Covariance accumulation: fastedit's CovarianceAccumulator (the SYRK kernel on CUDA, the
chunked fp32→fp64 torch path on CPU) against the references' fp32 running sum of kᵀk, and
against plain GEMMs.

Rates are TFLOP/s counting the triangle, tokens · d_k · (d_k + 1) FLOPs, for every entry (so
they compare as times do); the GEMM entries also give their full-matrix rate. On CUDA a square
bf16 GEMM measures the device's attainable bf16 rate, and the SYRK entry reports its fraction
of it (target: >= 70%).

    pytest benchmarks/bench_syrk.py --benchmark-enable            # CPU: d_k=1024, 4096 tokens
    (on a GPU: d_k=14336, 8192 bf16 tokens)
"""
import pytest
import torch

from baselines import covariance_fp32_running_sum
from fastedit.linalg import CovarianceAccumulator

CUDA = torch.cuda.is_available()
D_K, TOKENS, BATCH = (14336, 8192, 8192) if CUDA else (1024, 4096, 1024)
DEVICE = "cuda" if CUDA else "cpu"
_PEAK = {}


def _sync():
    if CUDA:
        torch.cuda.synchronize()


def _triangle_flops(tokens=TOKENS, d_k=D_K):
    return tokens * d_k * (d_k + 1)


def _record(benchmark, what, triangle_flops=None, full_flops=None):
    benchmark.extra_info.update(what=what, d_k=D_K, tokens=TOKENS, batch=BATCH, device=DEVICE)
    if CUDA:
        benchmark.extra_info["gpu"] = torch.cuda.get_device_name()
    stats = getattr(benchmark, "stats", None)
    if stats is None:  # --benchmark-disable: ran once as a smoke test, nothing timed
        return
    seconds = stats.stats.mean
    if triangle_flops:
        benchmark.extra_info["TFLOP/s (triangle)"] = round(triangle_flops / seconds / 1e12, 4)
    if full_flops:
        benchmark.extra_info["TFLOP/s (full GEMM)"] = round(full_flops / seconds / 1e12, 4)
    return seconds


@pytest.fixture(scope="module")
def keys():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(TOKENS, D_K, generator=gen) + 0.5
    return x.to(device=DEVICE, dtype=torch.bfloat16)


@pytest.mark.cuda
def test_bf16_gemm_peak(benchmark):
    """The attainable bf16 tensor-core rate on this GPU: a large square GEMM. First in the
    file, so the accumulator entry after it can report its fraction of this rate."""
    benchmark.group = "bf16 GEMM peak"
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)

    def run():
        a @ b
        _sync()

    benchmark(run)
    seconds = _record(benchmark, "square bf16 GEMM 8192³", full_flops=2 * n**3)
    if seconds:
        _PEAK["bf16"] = 2 * n**3 / seconds / 1e12


def test_fastedit_covariance_accumulator(benchmark, keys):
    benchmark.group = "covariance"
    acc = CovarianceAccumulator(D_K, device=DEVICE)

    def run():
        for batch in keys.split(BATCH):
            acc.update(batch)
        _sync()

    benchmark(run)
    seconds = _record(benchmark, "fastedit CovarianceAccumulator.update (two-level, lower "
                                 "triangle on CUDA)", _triangle_flops())
    if seconds and "bf16" in _PEAK:
        benchmark.extra_info["fraction of bf16 GEMM peak"] = round(
            _triangle_flops() / seconds / 1e12 / _PEAK["bf16"], 3)


def test_baseline_fp32_running_sum(benchmark, keys):
    benchmark.group = "covariance"

    def run():
        covariance_fp32_running_sum(keys.split(BATCH), D_K)
        _sync()

    benchmark(run)
    _record(benchmark, "baseline: fp32 running sum of kᵀk per batch (references)",
            _triangle_flops(), 2 * TOKENS * D_K * D_K)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16],
                         ids=["fp32", "bf16"])
def test_plain_gemm_xtx(benchmark, keys, dtype):
    if dtype == torch.bfloat16 and not CUDA:
        pytest.skip("bf16 GEMM rate is a GPU comparison")
    benchmark.group = "covariance"
    x = keys.to(dtype)

    def run():
        x.mT @ x
        _sync()

    benchmark(run)
    _record(benchmark, f"x.T @ x in {dtype} (one GEMM, full matrix)", _triangle_flops(),
            2 * TOKENS * D_K * D_K)
