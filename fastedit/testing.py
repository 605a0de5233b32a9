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


def random_covariance_with_null_space(n: int, *, null_fraction: float = 0.7, threshold: float = 2e-2,
                                      dtype=torch.float64, generator=None, device=None):
    """A random SPD (n, n) "covariance" with round(null_fraction·n) eigenvalues in
    [threshold/1000, threshold/2] (AlphaEdit's null space at that threshold) and the rest in
    [2·threshold, 1000·threshold], log-spaced, in random orthonormal directions. The random draw
    is on the CPU (``generator`` is a CPU generator), the QR and the product on ``device``."""
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=generator).to(device))
    r = round(null_fraction * n)
    small = torch.logspace(-3, torch.log10(torch.tensor(0.5)).item(), r, dtype=torch.float64)
    large = torch.logspace(torch.log10(torch.tensor(2.0)).item(), 3, n - r, dtype=torch.float64)
    eig = torch.cat([small, large]).to(q.device) * threshold
    c = (q * eig) @ q.mT
    return ((c + c.mT) / 2).to(dtype)
