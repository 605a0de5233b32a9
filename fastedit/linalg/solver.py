"""The MEMIT-family closed-form update, exact, by Cholesky.

    ΔW = R Kᵀ (λ C₀ + μ I + Σ_p s_p K_p K_pᵀ + K Kᵀ)⁻¹        (d × d_k)

``memit_solve`` is the one-off drop-in for the references' ``torch.linalg.solve``;
``UpdateSolver`` caches the factor of λC₀ + μI per layer and solves each batch by Woodbury
(O(d_k²·n) instead of O(d_k³)), with sequential key accumulation (MEMIT_seq).
"""
from __future__ import annotations

import torch

from fastedit.errors import InputError
from fastedit.linalg import backends
from fastedit.linalg._checks import (
    check_batch,
    check_finite,
    check_float,
    check_rows,
    check_same,
    check_square,
    check_symmetric,
)
from fastedit.linalg.cholesky import cholesky_apply_inverse, cholesky_factor, pivot_ratio
from fastedit.linalg.woodbury import LowRankCholesky

_HALF = (torch.float16, torch.bfloat16)


def _check_weight(name: str, w, batch: torch.Size, ref: torch.Tensor) -> torch.Tensor:
    """A non-negative finite scalar or a tensor broadcastable over ``batch``, as (..., 1, 1)."""
    if isinstance(w, torch.Tensor):
        if w.device != ref.device and w.dim() > 0:
            raise InputError(f"{name} is on {w.device} but the matrices are on {ref.device}")
        w = w.to(device=ref.device, dtype=ref.dtype)
        try:
            ok = torch.broadcast_shapes(w.shape, batch) == batch
        except RuntimeError:
            ok = False
        if not ok:
            raise InputError(
                f"{name} of shape {tuple(w.shape)} does not broadcast over the batch dimensions {tuple(batch)}"
            )
    elif isinstance(w, (int, float)) and not isinstance(w, bool):
        w = torch.tensor(float(w), dtype=ref.dtype, device=ref.device)
    else:
        raise InputError(f"{name} must be a float or a tensor, got {type(w).__name__}")
    if not bool((torch.isfinite(w) & (w >= 0)).all()):
        raise InputError(f"{name} must be finite and >= 0, got {w.tolist()}")
    return w[..., None, None]


def memit_solve(C, K, lam, *, layer=None, jitter=None, backend=None) -> torch.Tensor:
    """(λ C + K Kᵀ)⁻¹ K, the references' ``torch.linalg.solve(lam*C + K@K.mT, K)``, by Cholesky.

    C (..., d_k, d_k) SPD (the per-token mean covariance), K (..., d_k, n), leading batch dims
    broadcast; λ a float or a tensor broadcastable over the batch dims (one λ per system).
    Returns (..., d_k, n) in the inputs' dtype (float16/bfloat16 are solved in float32).
    ``layer`` labels errors; ``jitter`` opts in to a diagonal-shift retry (see cholesky_factor);
    ``backend``: None (auto), "torch" or "ext" (the compiled extension's Cholesky); see
    :mod:`fastedit.linalg.backends`.
    """
    backends.check(backend, "cholesky_ex", caller="memit_solve")
    check_float("C", C)
    check_float("K", K)
    check_square("C", C)
    check_rows("K", K, C.shape[-1], "one per row of C")
    check_same("K", K, "C", C)
    try:
        batch = torch.broadcast_shapes(C.shape[:-2], K.shape[:-2])
    except RuntimeError:
        raise InputError(
            f"the batch dimensions of C {tuple(C.shape[:-2])} and K {tuple(K.shape[:-2])} do not broadcast"
        ) from None
    check_finite("C", C)
    check_finite("K", K)
    out_dtype = C.dtype
    if out_dtype in _HALF:
        C, K = C.float(), K.float()
    lam = _check_weight("lam", lam, batch, C)
    A = torch.addcmul(K @ K.mT, lam, C)
    L = cholesky_factor(A, layer=layer, jitter=jitter, backend=backend, name="λ·C + K Kᵀ")
    return cholesky_apply_inverse(L, K).to(out_dtype)


class UpdateSolver:
    """ΔW = R Kᵀ (A + K Kᵀ)⁻¹ against a cached factor, A = λ C₀ + μ I + Σ accumulated keys.

    C0 (..., d_k, d_k): one layer's per-token mean covariance, or several layers stacked along
    leading batch dims (then K, R, λ, μ carry the same batch dims). λ, μ: floats or tensors
    broadcastable over the batch dims. Everything is computed in ``dtype`` (float64 by default).
    The factor of λC₀ + μI is computed here, once; ``solve`` costs O(d_k²·n) per batch.
    ``layer`` labels errors, ``jitter`` opts in to a diagonal-shift retry of a non-SPD A (see
    cholesky_factor), ``backend`` is None (auto), "torch" or "ext" (see :mod:`fastedit.linalg.backends`).
    Inspection: ``factor``, ``rank_since_refactor``, ``refactorizations``, ``pivot_ratio()``.
    """

    def __init__(self, C0, lam, *, mu=0.0, dtype=torch.float64, layer=None, jitter=None, backend=None):
        backends.check(backend, *backends.SOLVER_OPS, caller="UpdateSolver")
        check_float("C0", C0)
        check_square("C0", C0)
        if dtype not in (torch.float32, torch.float64):
            raise InputError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        check_finite("C0", C0)
        check_symmetric("C0", C0)
        C0 = C0.to(dtype)
        self.batch_shape = C0.shape[:-2]
        self.dtype = dtype
        self.layer = layer
        eye = torch.eye(C0.shape[-1], dtype=dtype, device=C0.device)
        A0 = _check_weight("lam", lam, self.batch_shape, C0) * C0 + _check_weight("mu", mu, self.batch_shape, C0) * eye
        self._state = LowRankCholesky(A0, layer=layer, backend=backend, jitter=jitter, name="λ·C0 + μ·I")

    @property
    def d_k(self) -> int:
        return self._state.n

    @property
    def device(self) -> torch.device:
        return self._state.A.device

    @property
    def factor(self) -> torch.Tensor:
        """The Cholesky factor of A at the last (re)factorisation."""
        return self._state.L

    @property
    def rank_since_refactor(self) -> int:
        """Columns of keys accumulated (added or removed) since the last refactorisation."""
        return self._state.rank_since_refactor

    @property
    def refactorizations(self) -> int:
        """Refactorisations of A triggered since construction (by FLOP count or ``refactor()``)."""
        return self._state.refactorizations

    def pivot_ratio(self) -> torch.Tensor:
        """min/max Cholesky pivot of the cached factor (>= 1/cond(A)); see linalg.pivot_ratio."""
        return pivot_ratio(self._state.L)

    def refactor(self) -> None:
        """Fold the accumulated keys into a fresh factor now (``accumulate`` does it by FLOP count)."""
        self._state.refactor()

    def _keys(self, K) -> torch.Tensor:
        check_float("K", K)
        check_rows("K", K, self.d_k, "d_k, the size of C0")
        check_batch("K", K, self.batch_shape, "C0")
        if K.device != self.device:
            raise InputError(f"K is on {K.device} but C0 is on {self.device}; move K to {self.device}")
        check_finite("K", K)
        return K.to(self.dtype)

    def solve(self, K, R, *, method: str = "auto") -> torch.Tensor:
        """ΔW = R Kᵀ (A + K Kᵀ)⁻¹, shape (..., d, d_k), in ``dtype``. K (..., d_k, n), R (..., d, n).

        ``method``: "woodbury" (against the cached factor), "direct" (factor A + KKᵀ afresh) or
        "auto" (fewer FLOPs; Woodbury unless n or the accumulated rank approaches d_k).
        """
        K = self._keys(K)
        check_float("R", R)
        check_batch("R", R, self.batch_shape, "C0")
        if R.shape[-1] != K.shape[-1]:
            raise InputError(f"R must have one column per key: K has {K.shape[-1]}, R has shape {tuple(R.shape)}")
        if R.device != self.device:
            raise InputError(f"R is on {R.device} but C0 is on {self.device}; move R to {self.device}")
        check_finite("R", R)
        T, Y = self._state.update_terms(K, R.to(self.dtype), method)
        return T.mT @ Y.mT

    def accumulate(self, K, sign: int = 1) -> None:
        """A += sign · K Kᵀ: keep (sign=1) or forget (sign=-1) a batch's keys for later solves."""
        if sign not in (1, -1):
            raise InputError(f"sign must be 1 or -1, got {sign!r}")
        self._state.add(self._keys(K), sign)
