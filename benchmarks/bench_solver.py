"""MEMIT's per-batch closed-form update: UpdateSolver.solve (Cholesky factor of λC₀ cached per
layer, Woodbury per batch) and memit_solve (one Cholesky per call) against the references'
float64 LU, ``solve(λC₀ + K Kᵀ, K)`` then R adjᵀ.

    FASTEDIT_BENCH_SIZE=full python -m pytest benchmarks/bench_solver.py --benchmark-enable --benchmark-only

C₀ has a covariance-like spectrum (eigenvalues 2e-5 … 20) and λ = 15000, as for GPT-J/Llama3;
d = d_k/4 on CPU (the ratio of the real models), 4096 on the GPU.
"""
from __future__ import annotations

import functools

import torch

from baselines import memit_lu_update
from fastedit.linalg import UpdateSolver, memit_solve
from fastedit.testing import random_covariance_with_null_space, rel_error

SIZES = {
    "small": [{"d_k": 257, "n": 13, "d": 65}],
    "full": [{"d_k": 4096, "n": 100, "d": 1024}],
    "gpu": [{"d_k": 14336, "n": 100, "d": 4096}, {"d_k": 16384, "n": 100, "d": 4096}],
}
TARGETS = {(4096, "cpu"): "≥ 8× vs fp64 LU", (14336, "cuda"): "≥ 30× vs fp64 LU"}
LAM = 15000.0
GROUP = "memit update per batch"


@functools.lru_cache(maxsize=1)
def _problem(d_k, n, d, device):
    g = torch.Generator().manual_seed(d_k * 1000 + n)
    C = random_covariance_with_null_space(d_k, generator=g, device=device)
    K = torch.randn(d_k, n, dtype=torch.float64, generator=g)
    R = torch.randn(d, n, dtype=torch.float64, generator=g) / d**0.5
    C, K, R = C.to(device), K.to(device), R.to(device)
    return C, K, R, memit_lu_update(C, K, R, LAM)


def _info(benchmark, size, role, op, flops):
    benchmark.group = GROUP
    benchmark.extra_info.update(role=role, op=op, flops=flops, dtype="float64", **size)


def _lu_flops(d_k, n, d):
    # K Kᵀ, LU, two triangular solves with n right-hand sides, R adjᵀ
    return 2 * d_k * d_k * n + 2 * d_k**3 / 3 + 2 * d_k * d_k * n + 2 * d * n * d_k


def test_fp64_lu_baseline(benchmark, size, device, timed):
    C, K, R, ref = _problem(size["d_k"], size["n"], size["d"], device)
    _info(benchmark, size, "baseline", "fp64 LU solve(λC + KKᵀ, K)", _lu_flops(**size))
    benchmark(timed(memit_lu_update), C, K, R, LAM)


def test_update_solver_cached(benchmark, size, device, timed):
    d_k, n, d = size["d_k"], size["n"], size["d"]
    C, K, R, ref = _problem(d_k, n, d, device)
    solver = UpdateSolver(C, LAM)
    # A⁻¹K by two triangular solves, G = I + KᵀY, its Cholesky, G⁻¹Rᵀ, ΔW = (G⁻¹Rᵀ)ᵀ Yᵀ
    flops = 2 * d_k * d_k * n + 2 * d_k * n * n + n**3 / 3 + 2 * n * n * d + 2 * d * n * d_k
    _info(benchmark, size, "fastedit", "UpdateSolver.solve (cached factor, Woodbury)", flops)
    target = TARGETS.get((d_k, device.type))
    if target:
        benchmark.extra_info["target"] = target
    out = benchmark(timed(solver.solve), K, R)
    benchmark.extra_info["rel_err"] = rel_error(out, ref)
    benchmark.extra_info["pivot_ratio"] = float(solver.pivot_ratio())
    assert benchmark.extra_info["rel_err"] <= 1e-6


def test_memit_solve_uncached(benchmark, size, device, timed):
    d_k, n, d = size["d_k"], size["n"], size["d"]
    C, K, R, ref = _problem(d_k, n, d, device)

    def update():
        return R @ memit_solve(C, K, LAM).mT

    # K Kᵀ, Cholesky, two triangular solves, R adjᵀ
    flops = 2 * d_k * d_k * n + d_k**3 / 3 + 2 * d_k * d_k * n + 2 * d * n * d_k
    _info(benchmark, size, "fastedit", "memit_solve (Cholesky, no cache)", flops)
    out = benchmark(timed(update))
    benchmark.extra_info["rel_err"] = rel_error(out, ref)
    assert benchmark.extra_info["rel_err"] <= 1e-6
