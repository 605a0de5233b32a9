"""Covariance accumulation: fastedit's CovarianceAccumulator (the SYRK kernel on CUDA, the
chunked fp32→fp64 torch path on CPU) against the references' fp32 running sum of kᵀk, and
against plain GEMMs.

Rates are TFLOP/s counting the triangle, tokens · d_k · (d_k + 1) FLOPs, for every entry (so
they compare as times do); the GEMM entries also give their full-matrix rate. On CUDA a square
bf16 GEMM measures the device's attainable bf16 rate, and the SYRK entry reports its fraction
of it (target: >= 70%).

    pytest benchmarks/bench_syrk.py --benchmark-enable            # CPU (full): d_k=1024, 4096 tokens
    (on a GPU: d_k=14336, 8192 bf16 tokens)
"""
import pytest
import torch

from baselines import covariance_fp32_running_sum
from fastedit.linalg import CovarianceAccumulator

SIZES = {
    "small": [{"d_k": 129, "tokens": 515, "batch": 128}],
    "full": [{"d_k": 1024, "tokens": 4096, "batch": 1024}],
    "gpu": [{"d_k": 14336, "tokens": 8192, "batch": 8192}],
}
GROUP = "covariance"
_PEAK = {}


def _triangle_flops(size):
    return size["tokens"] * size["d_k"] * (size["d_k"] + 1)


def _record(benchmark, size, role=None, **extra):
    """Group, role (none for the reference rates that are neither side), op, size, and the
    triangle's FLOPs; returns the mean seconds when timed (None in a smoke run)."""
    benchmark.group = extra.pop("group", GROUP)
    if role:
        benchmark.extra_info["role"] = role
    benchmark.extra_info.update(flops=_triangle_flops(size), **size, **extra)
    stats = getattr(benchmark, "stats", None)
    return stats.stats.mean if stats is not None else None


@pytest.fixture
def keys(size, device):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(size["tokens"], size["d_k"], generator=gen) + 0.5
    return x.to(device=device, dtype=torch.bfloat16)


@pytest.mark.cuda
def test_bf16_gemm_peak(benchmark, size, timed):
    """The attainable bf16 tensor-core rate on this GPU: a large square GEMM. First in the
    file, so the accumulator entry after it can report its fraction of this rate."""
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    benchmark(timed(torch.matmul), a, b)
    seconds = _record(benchmark, size, group="bf16 GEMM peak", op="square bf16 GEMM 8192³")
    benchmark.extra_info["flops"] = 2 * n**3
    if seconds:
        _PEAK["bf16"] = 2 * n**3 / seconds / 1e12


def test_fastedit_covariance_accumulator(benchmark, keys, size, device, timed):
    acc = CovarianceAccumulator(size["d_k"], device=device)

    def run():
        for batch in keys.split(size["batch"]):
            acc.update(batch)

    benchmark(timed(run))
    seconds = _record(benchmark, size, "fastedit", op="CovarianceAccumulator.update (two-level, lower triangle on CUDA)")
    if seconds and "bf16" in _PEAK:
        benchmark.extra_info["fraction of bf16 GEMM peak"] = round(
            _triangle_flops(size) / seconds / 1e12 / _PEAK["bf16"], 3)


def test_baseline_fp32_running_sum(benchmark, keys, size, timed):
    benchmark(timed(covariance_fp32_running_sum), keys.split(size["batch"]), size["d_k"])
    _record(benchmark, size, "baseline", op="fp32 running sum of kᵀk per batch (references)",
            full_gemm_flops=2 * size["tokens"] * size["d_k"] ** 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_plain_gemm_xtx(benchmark, keys, size, dtype, device, timed):
    if dtype == torch.bfloat16 and device.type != "cuda":
        pytest.skip("bf16 GEMM rate is a GPU comparison")
    x = keys.to(dtype)
    benchmark(timed(lambda: x.mT @ x))
    _record(benchmark, size, op=f"x.T @ x in {dtype} (one GEMM, full matrix)",
            full_gemm_flops=2 * size["tokens"] * size["d_k"] ** 2)
