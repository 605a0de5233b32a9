"""Cholesky factorisation with SPD diagnostics (failing batch index, layer, smallest pivot).

``cholesky_ex_torch`` is the reference of the extension's ``cholesky_ex``; ``cholesky_factor``
is what the solvers call: it checks the input, factors without a host sync, then checks the
status once and raises NotPositiveDefiniteError (or retries with an opt-in jitter).
"""
from __future__ import annotations

import warnings

import torch

from fastedit import _ext
from fastedit.errors import InputError, NotPositiveDefiniteError
from fastedit.linalg import backends
from fastedit.linalg._checks import check_cholesky_input, check_finite, check_float, check_square

#: How many times an opt-in jitter is grown ×10 before giving up.
JITTER_TRIES = 4


def cholesky_ex_torch(A: torch.Tensor):
    """Reference of ``fastedit._ext.cholesky_ex`` (and its fallback): ``(L, info, min_pivot)``
    without a host sync.

    A: (..., n, n) float32/float64, only its lower triangle is read. L: (..., n, n) lower with
    A = L Lᵀ where info == 0. info: int32 (...), 0 on success, else the 1-based column f whose
    pivot was <= 0 or NaN (LAPACK's convention). min_pivot (...) in A's dtype: min_j L_jj² for a
    good matrix; for a failed one the failing pivot d_f = A_ff − Σ_{k<f} L_fk², read from the
    partial factor; +inf for n = 0. Inputs are not checked here (the callers do).
    """
    L, info = torch.linalg.cholesky_ex(A)
    n = A.shape[-1]
    batch = A.shape[:-2]
    if n == 0:
        return L, torch.zeros(batch, dtype=torch.int32, device=A.device), A.new_full(batch, float("inf"))
    diag = L.diagonal(dim1=-2, dim2=-1)
    cols = torch.arange(n, device=A.device)
    info64 = info.long()
    accepted = torch.where(info64 > 0, info64 - 1, n)
    # Some LAPACKs let a NaN pivot through: a diagonal that is not > 0 among the accepted columns.
    nan_col = torch.where(~(diag > 0) & (cols < accepted.unsqueeze(-1)), cols, n).amin(-1)
    failed_col = torch.minimum(nan_col, torch.where(info64 > 0, accepted, n))
    failed = failed_col < n
    f = failed_col.clamp(max=n - 1)
    # The failing column's pivot from its row of the partial factor: O(n) per matrix, where a
    # pass over the whole factor would cost as much memory traffic as a triangular solve.
    row = torch.take_along_dim(L, f[..., None, None].expand(*batch, 1, n), dim=-2).squeeze(-2)
    row_sq = torch.where(cols < f.unsqueeze(-1), row * row, torch.zeros_like(row)).sum(-1)
    a_ff = torch.take_along_dim(A.diagonal(dim1=-2, dim2=-1), f.unsqueeze(-1), dim=-1).squeeze(-1)
    smallest = torch.where(failed.unsqueeze(-1), torch.ones_like(diag), diag * diag).amin(-1)
    min_pivot = torch.where(failed, a_ff - row_sq, smallest)
    info_out = torch.where(failed, failed_col + 1, 0).to(torch.int32)
    return L, info_out, min_pivot


def cholesky_ex(A: torch.Tensor, *, backend=None):
    """``(L, info, min_pivot)`` of A (..., n, n) by the chosen backend (None, "torch" or "ext";
    see :mod:`fastedit.linalg.backends`); see ``cholesky_ex_torch`` for the outputs."""
    check_cholesky_input(A)
    if backends.pick("cholesky_ex", backend, A) == "ext":
        return _ext.cholesky_ex(A)
    return cholesky_ex_torch(A)


def pivot_ratio(L: torch.Tensor) -> torch.Tensor:
    """min_j L_jj² / max_j L_jj² of a Cholesky factor L (..., n, n): a cheap condition estimate.

    Every pivot lies in [λ_min(A), λ_max(A)], so pivot_ratio(L) >= 1 / cond₂(A); a small ratio
    proves ill-conditioning, a ratio near 1 does not prove the opposite.
    """
    p = L.diagonal(dim1=-2, dim2=-1).square()
    return p.amin(-1) / p.amax(-1)


def cholesky_factor(A: torch.Tensor, *, layer=None, jitter=None, backend=None, name: str = "A") -> torch.Tensor:
    """Lower Cholesky factor L of the SPD matrix (or batch) A: A = L Lᵀ. A: (..., n, n).

    Raises InputError if A holds NaN/Inf, NotPositiveDefiniteError (with the first failing batch
    index, ``layer`` and the failing pivot) if A is not positive definite. With ``jitter`` (e.g.
    1e-10) a failed matrix is retried as A + ε·mean(diag A)·I, ε = jitter, 10·jitter, ... (up to
    ``JITTER_TRIES`` times), with a warning naming the ε used. ``name`` labels A in messages.
    """
    backends.check(backend, "cholesky_ex", caller="cholesky_factor")
    check_float(name, A)
    check_square(name, A)
    if jitter is not None and not (isinstance(jitter, (int, float)) and jitter > 0):
        raise InputError(f"jitter must be None or a positive float such as 1e-10, got {jitter!r}")
    check_finite(name, A)
    L, info, min_pivot = cholesky_ex(A, backend=backend)
    if not bool((info != 0).any()):
        return L
    if jitter is None:
        raise _not_pd_error(name, A, info, min_pivot, layer, hint=True)
    eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
    scale = A.diagonal(dim1=-2, dim2=-1).mean(-1)
    failed = info != 0
    eps = float(jitter)
    for _ in range(JITTER_TRIES):
        shift = torch.where(failed, eps * scale, torch.zeros_like(scale))
        L, info, min_pivot = cholesky_ex(A + shift[..., None, None] * eye, backend=backend)
        if not bool((info != 0).any()):
            where = "" if layer is None else f" (layer {layer})"
            warnings.warn(
                f"{name}{where} is not positive definite; factored {name} + {eps:g}·mean(diag {name})·I "
                f"instead (jitter {eps:g})",
                RuntimeWarning,
                stacklevel=2,
            )
            return L
        eps *= 10
    raise _not_pd_error(name, A, info, min_pivot, layer, hint=False, jitter=eps / 10)


def _not_pd_error(name, A, info, min_pivot, layer, *, hint: bool, jitter=None) -> NotPositiveDefiniteError:
    batch = A.shape[:-2]
    flat = int(torch.nonzero(info.reshape(-1))[0])
    index = None
    if batch:
        index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), batch))
    pivot = float(min_pivot.reshape(-1)[flat])
    column = int(info.reshape(-1)[flat])
    where = []
    if layer is not None:
        where.append(f"layer {layer}")
    if index is not None:
        where.append(f"batch index {index}")
    where_s = f" ({', '.join(where)})" if where else ""
    msg = (
        f"{name}{where_s} is not positive definite: Cholesky pivot {pivot:.3e} at column {column} "
        f"of {A.shape[-1]}."
    )
    if hint:
        msg += (
            " Check the covariance and λ (λ = 0 with a rank-deficient covariance is singular), "
            "or pass jitter=1e-10 to retry with a small diagonal shift."
        )
    else:
        msg += f" Retrying with a diagonal shift up to {jitter:g}·mean(diag) did not help."
    return NotPositiveDefiniteError(msg, index=index, layer=layer, min_pivot=pivot)


def cholesky_apply_inverse(L: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """A⁻¹ B for A = L Lᵀ by two triangular solves (2·n²·k FLOPs). L (..., n, n), B (..., n, k).

    The second solve, Lᵀ X = Z, is done as Xᵀ L = Zᵀ so that both solves read L in its stored
    layout: with a transposed L LAPACK/MKL copies the n × n factor first, which at n = 4096 made
    torch.cholesky_solve 2-3x slower than this on CPU.
    """
    Z = torch.linalg.solve_triangular(L, B, upper=False)
    return torch.linalg.solve_triangular(L, Z.mT, upper=False, left=False).mT
