"""cholesky_factor / cholesky_ex: factors, failing-pivot diagnostics, jitter, dispatch."""
from __future__ import annotations


import pytest
import torch

from fastedit import _ext
from fastedit.errors import InputError, NotPositiveDefiniteError
from fastedit.linalg import cholesky_ex, cholesky_factor, pivot_ratio
from fastedit.linalg.cholesky import cholesky_apply_inverse, cholesky_ex_torch
from fastedit.testing import assert_close, random_spd

F64 = torch.float64


def _break_pivot(A: torch.Tensor, col: int, pivot: float) -> torch.Tensor:
    """A copy of SPD A whose Cholesky pivot at 0-based ``col`` is exactly-ish ``pivot``."""
    L = torch.linalg.cholesky(A)
    B = A.clone()
    B[..., col, col] += pivot - L[..., col, col] ** 2
    return B


@pytest.mark.parametrize("n", [1, 7, 33, 97])
@pytest.mark.parametrize("batch", [(), (3,), (2, 3)])
def test_factor_matches_and_reconstructs(n, batch, gen):
    A = random_spd(n, batch=batch, cond=1e4, generator=gen)
    L = cholesky_factor(A)
    assert_close(L @ L.mT, A, 1e-12, "L Lᵀ")
    assert torch.equal(L, L.tril())
    ratio = pivot_ratio(L)
    eig = torch.linalg.eigvalsh(A)
    assert ratio.shape == batch
    assert bool(((ratio >= eig[..., 0] / eig[..., -1] * (1 - 1e-9)) & (ratio <= 1)).all())


@pytest.mark.parametrize("n", [7, 33, 97])
def test_apply_inverse_matches_solve(n, gen):
    A = random_spd(n, batch=(2,), cond=1e4, generator=gen)
    B = torch.randn(2, n, 5, dtype=F64, generator=gen)
    assert_close(cholesky_apply_inverse(cholesky_factor(A), B), torch.linalg.solve(A, B), 1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cholesky_ex_reports_failing_pivot_without_raising(dtype, gen):
    n, col = 33, 20
    A = random_spd(n, batch=(3,), cond=1e2, generator=gen)
    A[1] = _break_pivot(A[1], col, -0.25)
    A = A.to(dtype)
    L, info, min_pivot = cholesky_ex(A)
    assert info.dtype == torch.int32 and info.tolist() == [0, col + 1, 0]
    assert min_pivot.dtype == dtype
    assert abs(min_pivot[1].item() + 0.25) < (1e-4 if dtype == torch.float32 else 1e-10)
    for i in (0, 2):
        expected = L[i].diagonal().square().min()
        assert min_pivot[i].item() == pytest.approx(expected.item(), rel=1e-6)


def test_cholesky_ex_nan_pivot():
    A = torch.eye(5, dtype=F64)
    A[2, 2] = float("nan")
    _, info, min_pivot = cholesky_ex_torch(A)
    assert info.item() == 3 and torch.isnan(min_pivot)


def test_not_positive_definite_names_index_layer_and_pivot(gen):
    A = random_spd(13, batch=(2, 3), cond=1e2, generator=gen)
    A[1, 2] = _break_pivot(A[1, 2], 4, -2.0)
    with pytest.raises(NotPositiveDefiniteError) as exc:
        cholesky_factor(A, layer=7)
    err = exc.value
    assert err.index == (1, 2) and err.layer == 7
    assert err.min_pivot == pytest.approx(-2.0, rel=1e-9)
    msg = str(err)
    assert "layer 7" in msg and "(1, 2)" in msg and "-2.000e+00" in msg and "column 5" in msg and "jitter" in msg


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_input_is_an_input_error(bad, gen):
    A = random_spd(7, generator=gen)
    A[3, 1] = bad
    with pytest.raises(InputError, match="Cov contains NaN or Inf"):
        cholesky_factor(A, name="Cov")


def _with_negative_eigenvalue(n: int, rel: float, gen) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=F64, generator=gen))
    eig = torch.linspace(1, 2, n, dtype=F64)
    eig[0] = -rel * eig.mean()
    A = (q * eig) @ q.mT
    return (A + A.mT) / 2


def test_jitter_retries_with_growing_shift(gen):
    A = _with_negative_eigenvalue(33, 5e-11, gen)
    with pytest.raises(NotPositiveDefiniteError):
        cholesky_factor(A)
    with pytest.warns(RuntimeWarning, match=r"jitter 1e-10\)"):
        L = cholesky_factor(A, jitter=1e-12)
    shift = (L @ L.mT - A).diagonal().mean() / A.diagonal().mean()
    assert shift.item() == pytest.approx(1e-10, rel=1e-3)
    assert_close(L @ L.mT, A + 1e-10 * A.diagonal().mean() * torch.eye(33, dtype=F64), 1e-12)


def test_jitter_gives_up_with_a_clear_error(gen):
    A = _with_negative_eigenvalue(13, 1.0, gen)
    with pytest.raises(NotPositiveDefiniteError, match="diagonal shift up to 1e-09"):
        cholesky_factor(A, jitter=1e-12)


@pytest.mark.parametrize("jitter", [0.0, -1e-8, "1e-8"])
def test_bad_jitter_is_an_input_error(jitter):
    with pytest.raises(InputError, match="jitter"):
        cholesky_factor(torch.eye(3, dtype=F64), jitter=jitter)


def test_shape_and_dtype_errors_name_the_input():
    with pytest.raises(InputError, match="A must be square"):
        cholesky_factor(torch.ones(3, 4, dtype=F64))
    with pytest.raises(InputError, match="A must be a floating-point tensor"):
        cholesky_factor(torch.eye(3, dtype=torch.int64))


def test_backend_ext_unavailable_is_a_clear_error():
    if _ext.available():
        pytest.skip("the extension is built here")
    with pytest.raises(InputError, match="backend='ext'.*not available"):
        cholesky_factor(torch.eye(3, dtype=F64), backend="ext")
    with pytest.raises(InputError, match="backend must be"):
        cholesky_factor(torch.eye(3, dtype=F64), backend="cuda")


def test_backend_ext_routes_to_the_extension(monkeypatch, gen):
    calls = []

    def fake(A):
        calls.append(A.shape)
        return cholesky_ex_torch(A)

    monkeypatch.setattr(_ext, "available_for", lambda device: True)
    monkeypatch.setattr(_ext, "is_built", lambda: True)
    monkeypatch.setattr(_ext, "cholesky_ex", fake, raising=False)
    A = random_spd(5, generator=gen)
    assert_close(cholesky_factor(A, backend="ext"), torch.linalg.cholesky(A), 1e-12)
    assert calls == [A.shape]
    cholesky_factor(A)
    assert len(calls) == 2, "backend=None takes the built extension for cholesky_ex"
    cholesky_factor(A, backend="torch")
    assert len(calls) == 2
