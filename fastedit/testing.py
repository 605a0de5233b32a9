"""Helpers shared by the tests and the benchmarks (kept in the package so both can import it)."""
from __future__ import annotations

import torch


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """‖actual − expected‖_F / ‖expected‖_F computed in float64; NaN anywhere gives inf."""
    a = actual.detach().to(torch.float64).cpu()
    e = expected.detach().to(torch.float64).cpu()
    if a.shape != e.shape:
        raise AssertionError(f"shape mismatch: {tuple(a.shape)} vs {tuple(e.shape)}")
    if not torch.isfinite(a).all():
        return float("inf")
    denom = e.norm().item()
    num = (a - e).norm().item()
    return num / denom if denom > 0 else num


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, what: str = "result"):
    """Relative-RMS comparison that fails on NaN/Inf (unlike a plain allclose with equal_nan)."""
    err = rel_error(actual, expected)
    if not err <= rtol:
        raise AssertionError(f"{what}: relative error {err:.3e} > {rtol:.1e}")
    return err


def random_spd(n: int, *, batch=(), cond: float = 1e3, dtype=torch.float64, generator=None):
    """A random SPD matrix (or batch) with eigenvalues log-spaced in [1, cond]."""
    q, _ = torch.linalg.qr(torch.randn(*batch, n, n, dtype=torch.float64, generator=generator))
    eig = torch.logspace(0, torch.log10(torch.tensor(cond)).item(), n, dtype=torch.float64)
    a = (q * eig) @ q.transpose(-1, -2)
    return ((a + a.transpose(-1, -2)) / 2).to(dtype)
