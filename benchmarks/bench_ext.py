"""Compiled ops (csrc/) against the torch compositions they replace, side by side per group.

    FASTEDIT_BENCH_SIZE=full python -m pytest benchmarks/bench_ext.py --benchmark-enable \
        --benchmark-only --benchmark-group-by=group

cholesky_ex: torch.linalg.cholesky_ex alone (no diagnostics: the floor), the torch composition
that adds the diagnostics (fastedit.linalg.cholesky.cholesky_ex_torch) and the compiled op.
woodbury_solve: the torch composition (two triangular solves on [U B], capacitance, LU; the method as
written in ALGORITHMS.md §2) and the compiled op. Shapes follow the bench size: small (the CI
smoke test, each entry runs once), full (medium CPU sizes), gpu (with CUDA).
"""
from __future__ import annotations

import functools

import pytest
import torch

from fastedit import _ext
from fastedit.linalg.cholesky import cholesky_ex_torch
from fastedit.linalg.woodbury import woodbury_solve_torch
from fastedit.testing import assert_close

# Shapes per bench size (conftest's FASTEDIT_BENCH_SIZE): small runs once as the CI smoke test.
CHOLESKY_SIZES = {
    "small": [dict(n=65, batch=5, dtype="float64")],
    "full": [dict(n=1025, batch=5, dtype="float64")],
    "gpu": [dict(n=1025, batch=5, dtype="float64"), dict(n=4097, batch=1, dtype="float64"),
            dict(n=14337, batch=1, dtype="float32")],
}
WOODBURY_SIZES = {
    "small": [dict(n=129, m=7, k=5, dtype="float64")],
    "full": [dict(n=2049, m=100, k=100, dtype="float64")],
    "gpu": [dict(n=4097, m=100, k=100, dtype="float64"), dict(n=14337, m=100, k=100, dtype="float64")],
}


def pytest_generate_tests(metafunc):
    # Two shape tables in one file, so `size` is parametrised here rather than by conftest's SIZES.
    table = CHOLESKY_SIZES if metafunc.function.__name__ == "test_cholesky_ex" else WOODBURY_SIZES
    sizes = table[metafunc.config._fastedit_bench["size"]]
    ids = ["-".join(f"{k}={v}" for k, v in size.items()) for size in sizes]
    metafunc.parametrize("size", sizes, ids=ids)


@functools.lru_cache(maxsize=2)
def _spd(n, batch, dtype, device):
    """A well-conditioned SPD batch from one GEMM (cheaper than random_spd's QR at these sizes),
    shared by the implementations of one group."""
    gen = torch.Generator().manual_seed(n)
    G = torch.randn(*batch, n, n, dtype=torch.float64, generator=gen)
    return (G @ G.mT / n + torch.eye(n, dtype=torch.float64)).to(device, dtype)


def _need_compiled(device):
    if not _ext.available_for(device):
        pytest.skip(f"compiled ops unavailable on {device}: {_ext._LOADER.error or _ext._LOADER.cuda_error}")


# torch.linalg.cholesky_ex alone has no role: it lacks the diagnostics (the floor, not a baseline).
@pytest.mark.parametrize("impl,role", [("torch.linalg.cholesky_ex", None), ("torch composition", "baseline"),
                                       ("fastedit compiled", "fastedit")])
def test_cholesky_ex(benchmark, impl, role, size, device, timed):
    n, batch, dtype = size["n"], size["batch"], getattr(torch, size["dtype"])
    A = _spd(n, (batch,), dtype, device).clone()
    A[0, n // 2, n // 2] = -1.0  # one failed matrix, so the diagnostics do their full work
    if impl == "torch.linalg.cholesky_ex":
        fn = torch.linalg.cholesky_ex
    elif impl == "torch composition":
        fn = cholesky_ex_torch
    else:
        _need_compiled(device)
        fn = torch.ops.fastedit.cholesky_ex
    benchmark.group = f"cholesky_ex n={n} batch={batch} {size['dtype']}"
    benchmark.extra_info.update(op="cholesky_ex", flops=batch * n**3 / 3, **size)
    if role:
        benchmark.extra_info["role"] = role
    out = benchmark(timed(fn), A)
    if impl != "torch.linalg.cholesky_ex":
        _, info, min_pivot = out
        expected = cholesky_ex_torch(A)
        assert torch.equal(info, expected[1])
        assert_close(min_pivot, expected[2], 1e-6 if dtype == torch.float64 else 1e-4, "min_pivot")


@pytest.mark.parametrize("impl,role", [("torch composition", "baseline"), ("fastedit compiled", "fastedit")])
def test_woodbury_solve(benchmark, impl, role, size, device, timed):
    n, m, k, dtype = size["n"], size["m"], size["k"], getattr(torch, size["dtype"])
    gen = torch.Generator().manual_seed(n + m)
    A0 = _spd(n, (), dtype, device)
    L = torch.linalg.cholesky(A0)
    U = (torch.randn(n, m, dtype=torch.float64, generator=gen) / n**0.5).to(device, dtype)
    s = torch.ones(m, dtype=torch.float64)
    s[1::2] = -1.0
    s = s.to(device, dtype)
    B = torch.randn(n, k, dtype=torch.float64, generator=gen).to(device, dtype)
    if impl == "torch composition":
        fn = woodbury_solve_torch
    else:
        _need_compiled(device)
        fn = torch.ops.fastedit.woodbury_solve
    benchmark.group = f"woodbury_solve n={n} m={m} k={k} {size['dtype']}"
    benchmark.extra_info.update(role=role, op="woodbury_solve", **size)
    X = benchmark(timed(fn), L, U, s, B)
    A = A0 + (U * s) @ U.mT
    residual = torch.linalg.matrix_norm(A @ X - B) / torch.linalg.matrix_norm(B)
    assert residual.item() < (1e-8 if dtype == torch.float64 else 1e-3)
