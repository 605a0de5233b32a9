"""Compiled ops (csrc/) against the torch compositions they replace, side by side per group.

    python -m pytest benchmarks/bench_ext.py --benchmark-enable --benchmark-group-by=group

cholesky_ex: torch.linalg.cholesky_ex alone (no diagnostics: the floor), the torch composition
that adds the diagnostics (fastedit.linalg.cholesky.cholesky_ex_torch) and the compiled op.
woodbury_solve: the torch composition (two triangular solves on [U B], capacitance, LU; the method as
written in ALGORITHMS.md §2) and the compiled op. Small CPU sizes always (each runs once as a
smoke test in CI, where benchmarks are disabled), medium CPU sizes with --benchmark-enable,
GPU sizes too when CUDA is available.
"""
from __future__ import annotations

import functools

import pytest
import torch

from fastedit import _ext
from fastedit.linalg.cholesky import cholesky_ex_torch
from fastedit.linalg.woodbury import woodbury_solve_torch
from fastedit.testing import assert_close

# (n, batch, dtype) and (n, m, k, dtype). The medium CPU sizes run only when benchmarks are
# enabled, so the CI smoke run (benchmarks disabled) stays at the small ones.
CPU_CHOLESKY = [(65, 5, torch.float64)]
CPU_CHOLESKY_MEDIUM = [(1025, 5, torch.float64)]
GPU_CHOLESKY = [(1025, 5, torch.float64), (4097, 1, torch.float64), (14337, 1, torch.float32)]
CPU_WOODBURY = [(129, 7, 5, torch.float64)]
CPU_WOODBURY_MEDIUM = [(2049, 100, 100, torch.float64)]
GPU_WOODBURY = [(4097, 100, 100, torch.float64), (14337, 100, 100, torch.float64)]


def pytest_generate_tests(metafunc):
    options = metafunc.config.option
    medium = getattr(options, "benchmark_enable", False) or not getattr(options, "benchmark_disable", True)
    if metafunc.function.__name__ == "test_cholesky_ex":
        cpu, gpu, names = CPU_CHOLESKY + medium * CPU_CHOLESKY_MEDIUM, GPU_CHOLESKY, "device,n,batch,dtype"
    else:
        cpu, gpu, names = CPU_WOODBURY + medium * CPU_WOODBURY_MEDIUM, GPU_WOODBURY, "device,n,m,k,dtype"
    cases = [pytest.param("cpu", *case, id=f"cpu-{'-'.join(map(str, case))}") for case in cpu]
    # tests/conftest.py's skip of `cuda` items does not reach benchmarks/: skip here too.
    gpu_marks = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
    cases += [pytest.param("cuda", *case, id=f"cuda-{'-'.join(map(str, case))}", marks=gpu_marks) for case in gpu]
    metafunc.parametrize(names, cases)


@functools.lru_cache(maxsize=2)
def _spd(n, batch, dtype, device):
    """A well-conditioned SPD batch from one GEMM (cheaper than random_spd's QR at these sizes),
    shared by the implementations of one group."""
    gen = torch.Generator().manual_seed(n)
    G = torch.randn(*batch, n, n, dtype=torch.float64, generator=gen)
    return (G @ G.mT / n + torch.eye(n, dtype=torch.float64)).to(device, dtype)


def _timed(fn, device):
    if device == "cuda":

        def run():
            out = fn()
            torch.cuda.synchronize()
            return out

        return run
    return fn


def _need_compiled(device):
    if not _ext.available_for(device):
        pytest.skip(f"compiled ops unavailable on {device}: {_ext._LOADER.error or _ext._LOADER.cuda_error}")


@pytest.mark.parametrize("impl", ["torch.linalg.cholesky_ex", "torch composition", "fastedit compiled"])
def test_cholesky_ex(benchmark, impl, device, n, batch, dtype):
    A = _spd(n, (batch,), dtype, device).clone()
    A[0, n // 2, n // 2] = -1.0  # one failed matrix, so the diagnostics do their full work
    if impl == "torch.linalg.cholesky_ex":
        fn = lambda: torch.linalg.cholesky_ex(A)  # noqa: E731
    elif impl == "torch composition":
        fn = lambda: cholesky_ex_torch(A)  # noqa: E731
    else:
        _need_compiled(device)
        fn = lambda: torch.ops.fastedit.cholesky_ex(A)  # noqa: E731
    benchmark.group = f"cholesky_ex {device} n={n} batch={batch} {str(dtype)[6:]}"
    benchmark.extra_info.update(n=n, batch=batch, dtype=str(dtype), device=device)
    out = benchmark(_timed(fn, device))
    if impl != "torch.linalg.cholesky_ex":
        _, info, min_pivot = out
        expected = cholesky_ex_torch(A)
        assert torch.equal(info, expected[1])
        assert_close(min_pivot, expected[2], 1e-6 if dtype == torch.float64 else 1e-4, "min_pivot")


@pytest.mark.parametrize("impl", ["torch composition", "fastedit compiled"])
def test_woodbury_solve(benchmark, impl, device, n, m, k, dtype):
    gen = torch.Generator().manual_seed(n + m)
    A0 = _spd(n, (), dtype, device)
    L = torch.linalg.cholesky(A0)
    U = (torch.randn(n, m, dtype=torch.float64, generator=gen) / n**0.5).to(device, dtype)
    s = torch.ones(m, dtype=torch.float64)
    s[1::2] = -1.0
    s = s.to(device, dtype)
    B = torch.randn(n, k, dtype=torch.float64, generator=gen).to(device, dtype)
    if impl == "torch composition":
        fn = lambda: woodbury_solve_torch(L, U, s, B)  # noqa: E731
    else:
        _need_compiled(device)
        fn = lambda: torch.ops.fastedit.woodbury_solve(L, U, s, B)  # noqa: E731
    benchmark.group = f"woodbury_solve {device} n={n} m={m} k={k} {str(dtype)[6:]}"
    benchmark.extra_info.update(n=n, m=m, k=k, dtype=str(dtype), device=device)
    X = benchmark(_timed(fn, device))
    A = A0 + (U * s) @ U.mT
    residual = torch.linalg.matrix_norm(A @ X - B) / torch.linalg.matrix_norm(B)
    assert residual.item() < (1e-8 if dtype == torch.float64 else 1e-3)
