"""AlphaEdit's per-batch update: NullSpace.solve (the r × r SPD system in the null space, its
factor cached, the accumulated keys as a Woodbury term) against the reference's dense
projector and non-symmetric float32 LU, ``solve(P (K Kᵀ + C_p) + αI, P K Rᵀ)``.

    FASTEDIT_BENCH_SIZE=full python -m pytest benchmarks/bench_null_space.py --benchmark-enable --benchmark-only

C₀ has 70% of its eigenvalues below the 2e-2 threshold (r ≈ 0.7·d_k, as reported for Llama3);
C_p holds the keys of 5 earlier batches; α = 10 (AlphaEdit's L2). Errors are against the dense
formulation in float64.
"""
from __future__ import annotations

import functools

import torch

from baselines import alphaedit_dense_update
from fastedit.linalg import NullSpace
from fastedit.testing import random_covariance_with_null_space, rel_error

SIZES = {
    "small": [{"d_k": 257, "n": 13, "d": 65}],
    "full": [{"d_k": 4096, "n": 100, "d": 1024}],
    "gpu": [{"d_k": 14336, "n": 100, "d": 4096}],
}
TARGETS = {(4096, "cpu"): "≥ 10× vs dense-P fp32 LU", (14336, "cuda"): "≥ 30× vs dense-P fp32 LU"}
ALPHA = 10.0
EARLIER_BATCHES = 5
GROUP = "alphaedit update per batch"


@functools.lru_cache(maxsize=1)
def _problem(d_k, n, d, device):
    g = torch.Generator().manual_seed(d_k * 1000 + n + 1)
    C0 = random_covariance_with_null_space(d_k, null_fraction=0.7, generator=g, device=device)
    earlier = [torch.randn(d_k, n, dtype=torch.float64, generator=g).to(device) for _ in range(EARLIER_BATCHES)]
    K = torch.randn(d_k, n, dtype=torch.float64, generator=g).to(device)
    R = (torch.randn(d, n, dtype=torch.float64, generator=g) / d**0.5).to(device)
    ns = NullSpace.from_covariance(C0)
    cache_c = sum(Kp @ Kp.mT for Kp in earlier)
    ref = alphaedit_dense_update(ns.projector(), K, R, ALPHA, cache_c)
    return ns, earlier, K, R, cache_c, ref


def _info(benchmark, size, role, op, dtype, flops):
    benchmark.group = GROUP
    benchmark.extra_info.update(role=role, op=op, dtype=dtype, flops=flops, **size)


def test_dense_fp32_baseline(benchmark, size, device, timed):
    d_k, n, d = size["d_k"], size["n"], size["d"]
    ns, _, K, R, cache_c, ref = _problem(d_k, n, d, device)
    P, K32, R32, C32 = ns.projector().float(), K.float(), R.float(), cache_c.float()
    # K Kᵀ, P (KKᵀ + C_p), LU, its solve with d right-hand sides, P K, (P K) Rᵀ
    flops = 2 * d_k * d_k * n + 2 * d_k**3 + 2 * d_k**3 / 3 + 2 * d_k * d_k * d + 2 * d_k * d_k * n + 2 * d_k * n * d
    _info(benchmark, size, "baseline", "dense-P fp32 LU (reference)", "float32", flops)
    out = benchmark(timed(alphaedit_dense_update), P, K32, R32, ALPHA, C32)
    benchmark.extra_info["rel_err"] = rel_error(out, ref)


def test_null_space_reduced(benchmark, size, device, timed):
    d_k, n, d = size["d_k"], size["n"], size["d"]
    cached, earlier, K, R, _, ref = _problem(d_k, n, d, device)
    ns = NullSpace(cached.Q, cached.eigenvalues, cached.threshold)
    # The steady state of sequential editing: the factor of Qᵀ C_p Q + αI was made at an earlier
    # batch (per-layer set-up, not timed) and the last batch's keys ride along as a Woodbury term.
    for Kp in earlier[:-1]:
        ns.accumulate(Kp)
    ns.solve(K, R, ALPHA)
    ns.accumulate(earlier[-1])
    r, m = ns.rank, ns.rank_since_refactor
    # Qᵀ K; A⁻¹(QᵀK): two triangular solves + the rank-m correction (UᵀZ, capacitance, Y·);
    # G = I + KᵀY, its Cholesky, G⁻¹Rᵀ; Q Y; ΔW
    flops = (2 * r * d_k * n + 2 * r * r * n + 4 * r * m * n + 2 * m * m * n + 2 * m**3 / 3
             + 2 * r * n * n + n**3 / 3 + 2 * n * n * d + 2 * d_k * r * n + 2 * d * n * d_k)
    _info(benchmark, size, "fastedit", "NullSpace.solve (r × r Cholesky, cached)", "float64", flops)
    benchmark.extra_info.update(rank=r, rank_since_refactor=m)
    target = TARGETS.get((d_k, device.type))
    if target:
        benchmark.extra_info["target"] = target
    # A fixed number of rounds: each solve adds to the FLOPs the low-rank term has cost, and
    # enough of them trigger a refactorisation (at the full sizes, not within 11 calls).
    out = benchmark.pedantic(timed(ns.solve), args=(K, R, ALPHA), rounds=10, warmup_rounds=1)
    benchmark.extra_info["refactorizations"] = ns.refactorizations
    benchmark.extra_info["rel_err"] = rel_error(out, ref)
    assert benchmark.extra_info["rel_err"] <= 1e-6
