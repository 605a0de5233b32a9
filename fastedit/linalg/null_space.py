"""AlphaEdit's null-space constrained update, solved in the r-dimensional null space.

With Q (d_k × r) the eigenvectors of C₀ whose eigenvalue is below the threshold and P = QQᵀ,
the reference's non-symmetric d_k × d_k system solve(P(KKᵀ + C_p) + αI, P K Rᵀ) equals

    ΔWᵀ = Q (Qᵀ (C_p + K Kᵀ) Q + α I)⁻¹ Qᵀ K Rᵀ

an r × r SPD system. NullSpace solves that with a cached Cholesky factor of Qᵀ C_p Q + αI and
the keys accumulated since as a Woodbury low-rank term (the same machinery as UpdateSolver).
"""
from __future__ import annotations

import torch

from fastedit.errors import InputError, NotPositiveDefiniteError
from fastedit.linalg import backends
from fastedit.linalg._checks import check_finite, check_float, check_rows, check_same, check_square, check_symmetric
from fastedit.linalg.woodbury import LowRankCholesky


def alphaedit_dense_reference(P, K, R, alpha, cache_c) -> torch.Tensor:
    """The reference's formulation, for tests and baselines: ΔW with
    ΔWᵀ = solve(P (K Kᵀ + C_p) + α I, P K Rᵀ), a non-symmetric LU in the inputs' dtype.

    P (d_k, d_k), K (d_k, n), R (d, n), cache_c = C_p (d_k, d_k). Returns (d, d_k).
    """
    eye = torch.eye(P.shape[-1], dtype=P.dtype, device=P.device)
    return torch.linalg.solve(P @ (K @ K.mT + cache_c) + alpha * eye, P @ K @ R.mT).mT


class NullSpace:
    """The approximate null space of C₀ and AlphaEdit's solve restricted to it.

    Attributes: Q (d_k, r) orthonormal basis, rank r, eigenvalues (d_k,) of C₀ ascending,
    threshold. Build it with ``NullSpace.from_covariance``.
    """

    def __init__(self, Q: torch.Tensor, eigenvalues: torch.Tensor, threshold: float, *, layer=None, backend=None):
        self.Q = Q
        self.eigenvalues = eigenvalues
        self.threshold = threshold
        self.layer = layer
        self.backend = backends.check(backend, *backends.SOLVER_OPS, caller="NullSpace")
        self._cp = Q.new_zeros(self.rank, self.rank)
        self._state = None
        self._alpha = None

    @classmethod
    def from_covariance(cls, C0, threshold: float = 2e-2, *, dtype=torch.float64, layer=None, backend=None):
        """Q = eigenvectors of C0 (d_k, d_k) with eigenvalue < ``threshold`` (absolute), by eigh
        in ``dtype``.

        C0 must be a covariance: symmetric (eigh would read only its lower triangle) and
        positive semidefinite up to rounding (a negative-definite C0 would make the whole space
        "null" and preserve nothing); otherwise InputError / NotPositiveDefiniteError.
        """
        check_float("C0", C0)
        check_square("C0", C0)
        if C0.dim() != 2:
            raise InputError(f"C0 must be one (d_k, d_k) covariance, got shape {tuple(C0.shape)}")
        _check_threshold(threshold)
        check_finite("C0", C0)
        check_symmetric("C0", C0)
        eigenvalues, vectors = torch.linalg.eigh(C0.to(dtype))
        _check_semidefinite(eigenvalues, layer)
        Q = vectors[:, eigenvalues < threshold].contiguous()
        return cls(Q, eigenvalues, threshold, layer=layer, backend=backend)

    @classmethod
    def from_basis(cls, Q, eigenvalues, threshold: float, *, layer=None, backend=None):
        """The null space from a basis computed before (e.g. cached beside the statistics):
        ``Q`` (d_k, r) and all ``eigenvalues`` (d_k,) ascending, as :meth:`from_covariance`
        made them for ``threshold``. Checks shapes, dtype, finiteness, semidefiniteness and that
        r equals the number of eigenvalues below the threshold; Q's orthonormality is the
        producer's (checking it costs as much as the solve it saves)."""
        check_float("Q", Q)
        check_float("eigenvalues", eigenvalues, min_dim=1)
        _check_threshold(threshold)
        if Q.dim() != 2 or eigenvalues.dim() != 1 or Q.shape[0] != eigenvalues.shape[0]:
            raise InputError(f"Q must be (d_k, r) and eigenvalues (d_k,), got shapes {tuple(Q.shape)} and "
                             f"{tuple(eigenvalues.shape)}")
        check_same("eigenvalues", eigenvalues, "Q", Q)
        check_finite("Q", Q)
        check_finite("eigenvalues", eigenvalues)
        if eigenvalues.numel() > 1 and bool((eigenvalues[1:] < eigenvalues[:-1]).any()):
            raise InputError("eigenvalues must be in ascending order (as torch.linalg.eigh returns them)")
        _check_semidefinite(eigenvalues, layer)
        below = int((eigenvalues < threshold).sum())
        if below != Q.shape[1]:
            raise InputError(f"Q has {Q.shape[1]} columns but {below} eigenvalues are below the threshold "
                             f"{threshold:g}; the basis was made for another threshold or covariance")
        return cls(Q.contiguous(), eigenvalues, threshold, layer=layer, backend=backend)

    @property
    def d_k(self) -> int:
        return self.Q.shape[0]

    @property
    def rank(self) -> int:
        return self.Q.shape[1]

    @property
    def rank_since_refactor(self) -> int:
        """Key columns carried as a low-rank term since the reduced system was last factored."""
        return 0 if self._state is None else self._state.rank_since_refactor

    @property
    def refactorizations(self) -> int:
        return 0 if self._state is None else self._state.refactorizations

    def projector(self) -> torch.Tensor:
        """P = Q Qᵀ (d_k × d_k). For tests and baselines only: the solver never forms it."""
        return self.Q @ self.Q.mT

    def _reduce(self, name: str, K) -> torch.Tensor:
        check_float(name, K)
        if K.dim() != 2:
            raise InputError(f"{name} must be a (d_k, n) matrix, got shape {tuple(K.shape)}")
        check_rows(name, K, self.d_k, "d_k, the size of C0")
        if K.device != self.Q.device:
            raise InputError(f"{name} is on {K.device} but Q is on {self.Q.device}; move it to {self.Q.device}")
        check_finite(name, K)
        return self.Q.mT @ K.to(self.Q.dtype)

    def accumulate(self, K, sign: int = 1) -> None:
        """C_p += sign · K Kᵀ (kept reduced, as Qᵀ C_p Q). K (d_k, n)."""
        if sign not in (1, -1):
            raise InputError(f"sign must be 1 or -1, got {sign!r}")
        Kr = self._reduce("K", K)
        if self._state is not None:
            self._state.add(Kr, sign)
        self._cp.addmm_(Kr, Kr.mT, alpha=sign)

    def _state_for(self, alpha: float) -> LowRankCholesky:
        if self._state is None or alpha != self._alpha:
            eye = torch.eye(self.rank, dtype=self.Q.dtype, device=self.Q.device)
            self._state = LowRankCholesky(self._cp + alpha * eye, layer=self.layer, backend=self.backend,
                                          name="Qᵀ C_p Q + α·I")
            self._alpha = alpha
        return self._state

    def solve(self, K, R, alpha, accumulated=None, *, method: str = "auto") -> torch.Tensor:
        """ΔW (d, d_k), ΔWᵀ = Q (Qᵀ(C_p + K Kᵀ)Q + α I)⁻¹ Qᵀ K Rᵀ, in Q's dtype.

        K (d_k, n), R (d, n), α > 0 (AlphaEdit's L2). C_p is the keys given to ``accumulate``,
        or ``accumulated`` (d_k, d_k) when passed (then the internal state is not used).
        ``method`` as in UpdateSolver.solve.
        """
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not alpha > 0:
            raise InputError(f"alpha must be a positive float (AlphaEdit's L2), got {alpha!r}")
        alpha = float(alpha)
        Kr = self._reduce("K", K)
        check_float("R", R)
        if R.dim() != 2 or R.shape[-1] != K.shape[-1]:
            raise InputError(f"R must be (d, n) with n = {K.shape[-1]} columns like K, got shape {tuple(R.shape)}")
        if R.device != self.Q.device:
            raise InputError(f"R is on {R.device} but Q is on {self.Q.device}; move it to {self.Q.device}")
        check_finite("R", R)
        R = R.to(self.Q.dtype)
        if self.rank == 0:
            return R.new_zeros(R.shape[0], self.d_k)
        if accumulated is None:
            state = self._state_for(alpha)
        else:
            check_float("accumulated", accumulated)
            check_square("accumulated", accumulated)
            check_rows("accumulated", accumulated, self.d_k, "d_k")
            check_same("accumulated", accumulated, "Q", self.Q, dtype=False)
            check_finite("accumulated", accumulated)
            Cr = self.Q.mT @ accumulated.to(self.Q.dtype) @ self.Q
            eye = torch.eye(self.rank, dtype=self.Q.dtype, device=self.Q.device)
            state = LowRankCholesky((Cr + Cr.mT) / 2 + alpha * eye, layer=self.layer, backend=self.backend,
                                    name="Qᵀ C_p Q + α·I")
        T, Y = state.update_terms(Kr, R, method)
        return T.mT @ (self.Q @ Y).mT


def _check_threshold(threshold) -> None:
    if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or not threshold >= 0:
        raise InputError(f"threshold must be a float >= 0 (the null-space eigenvalue bound), got {threshold!r}")


#: A covariance's eigenvalues may dip below zero by rounding: about √d_k · ε relative to the
#: largest; this bound, far above that and far below any real negative eigenvalue, separates them.
_PSD_RTOL = 1e-5


def _check_semidefinite(eigenvalues: torch.Tensor, layer) -> None:
    """NotPositiveDefiniteError when the smallest eigenvalue is negative beyond rounding."""
    if eigenvalues.numel() == 0:
        return
    lo, top = float(eigenvalues.min()), float(eigenvalues.abs().max())
    if lo < -_PSD_RTOL * eigenvalues.numel() ** 0.5 * top:
        where = f" of layer {layer}" if layer is not None else ""
        raise NotPositiveDefiniteError(
            f"C0{where} is not positive semidefinite: its smallest eigenvalue is {lo:.3e} (largest magnitude "
            f"{top:.3e}); a covariance E[k kᵀ] has none below zero. Check how C0 was computed (a sign flip, "
            "a difference of covariances, or a damaged file)", layer=layer, min_pivot=lo)
