"""Solves against a cached Cholesky factor plus a signed low-rank term (Woodbury identity).

    (L₀L₀ᵀ + U S Uᵀ)⁻¹ B = Z − Y (S⁻¹ + Uᵀ Y)⁻¹ Uᵀ Z,   Z = A₀⁻¹ B,  Y = A₀⁻¹ U,  A₀ = L₀L₀ᵀ

``woodbury_solve_torch`` is the stateless reference of the extension's ``woodbury_solve``.
``LowRankCholesky`` keeps A₀'s factor, the key blocks added or removed since (U, signs S) and
Y = A₀⁻¹U between calls, and decides by FLOP counts when to refactor and whether a solve goes
through Woodbury or a direct factorisation. UpdateSolver and NullSpace are built on it.

FLOP counts below use n for the matrix size, m for the low-rank width, k/c for new columns;
a triangular solve with c right-hand sides costs n²·c, a GEMM (a×b)(b×c) 2·a·b·c, a Cholesky
n³/3, an LU 2n³/3.
"""
from __future__ import annotations

import torch

from fastedit import _ext
from fastedit.errors import InputError, NotPositiveDefiniteError
from fastedit.linalg import backends
from fastedit.linalg._checks import check_woodbury_inputs
from fastedit.linalg.cholesky import cholesky_apply_inverse, cholesky_factor


def _correct(Z: torch.Tensor, U: torch.Tensor, Y: torch.Tensor, cap_solve) -> torch.Tensor:
    """Z − Y cap⁻¹ (Uᵀ Z): the low-rank correction of the Woodbury identity."""
    return Z - Y @ cap_solve(U.mT @ Z)


def woodbury_solve_torch(L: torch.Tensor, U: torch.Tensor, s: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Reference of ``fastedit._ext.woodbury_solve``: X with (L Lᵀ + U diag(s) Uᵀ) X = B.

    L (..., n, n) lower Cholesky factor; U (..., n, m); s (..., m) nonzero weights (±1 for keys
    added/removed); B (..., n, k). m may be 0. The m × m capacitance diag(1/s) + Uᵀ(LLᵀ)⁻¹U is
    symmetric but indefinite when signs are mixed, so it is solved by LU (without a host sync:
    an exactly singular capacitance, i.e. a singular system, gives a non-finite X, as the
    compiled op does). Inputs are not checked here (the callers do).
    """
    Z = cholesky_apply_inverse(L, B)
    if U.shape[-1] == 0:
        return Z
    Y = cholesky_apply_inverse(L, U)
    cap = torch.diag_embed(1.0 / s) + U.mT @ Y
    LU, pivots, _ = torch.linalg.lu_factor_ex(cap)
    return _correct(Z, U, Y, lambda W: torch.linalg.lu_solve(LU, pivots, W))


def woodbury_solve(L, U, s, B, *, backend=None) -> torch.Tensor:
    """X with (L Lᵀ + U diag(s) Uᵀ) X = B, by the chosen backend (None, "torch" or "ext"; see
    :mod:`fastedit.linalg.backends`); see ``woodbury_solve_torch`` for shapes."""
    check_woodbury_inputs(L, U, s, B)
    if backends.pick("woodbury_solve", backend, L) == "ext":
        return _ext.woodbury_solve(L, U, s, B)
    return woodbury_solve_torch(L, U, s, B)


class LowRankCholesky:
    """An SPD matrix A (..., n, n) that changes by signed rank-k terms A += sign·V Vᵀ.

    Holds A itself (exact running sum), the factor L₀ of A at the last refactorisation and the
    blocks V added or removed since, so that A = L₀L₀ᵀ + U diag(s) Uᵀ. Refactoring is decided
    ski-rental style: the FLOPs spent because of the low-rank term (A₀⁻¹V at each add, the
    capacitance and the correction at each solve) are counted, and once they reach the cost of a
    refactorisation (n³/3) A is refactored, which keeps the total within 2x of the best offline
    choice without knowing how many solves will follow.
    """

    def __init__(self, A: torch.Tensor, *, layer=None, backend=None, jitter=None, name: str = "A"):
        self.A = A
        self.layer = layer
        self.backend = backends.check(backend, *backends.SOLVER_OPS, caller="LowRankCholesky")
        self.jitter = jitter
        self.name = name
        self.refactorizations = 0
        self._factor()

    @property
    def n(self) -> int:
        return self.A.shape[-1]

    @property
    def rank_since_refactor(self) -> int:
        return self.U.shape[-1]

    @property
    def refactor_flops(self) -> float:
        return self.n**3 / 3

    def _factor(self) -> None:
        self.L = cholesky_factor(self.A, layer=self.layer, jitter=self.jitter, backend=self.backend, name=self.name)
        empty = self.A.new_zeros(*self.A.shape[:-1], 0)
        self.U, self.Y = empty, empty.clone()
        self.cap = self.A.new_zeros(*self.A.shape[:-2], 0, 0)
        self.signs: list[int] = []
        self._blocks: list[tuple[int, int]] = []  # (width, sign) of each key block, in U's order
        self._cap_solve = None
        self.overhead_flops = 0.0

    def refactor(self) -> None:
        """Factor the current A afresh and drop the low-rank term."""
        self._factor()
        self.refactorizations += 1

    def _maybe_refactor(self) -> None:
        if self.rank_since_refactor and self.overhead_flops >= self.refactor_flops:
            self.refactor()

    def add(self, V: torch.Tensor, sign: int) -> None:
        """A += sign · V Vᵀ. V (..., n, k). Raises NotPositiveDefiniteError (state unchanged) if
        a removal would leave A indefinite."""
        n, m, k = self.n, self.rank_since_refactor, V.shape[-1]
        if k == 0:
            return
        start = 0
        for i, (width, s) in enumerate(self._blocks):
            # Removing exactly the keys added since the last refactorisation (or re-adding removed
            # ones) cancels their block: the state is then the one before they came, bit for bit.
            # U holds our own copy of the keys, so a caller mutating K in between cannot fool this.
            if s == -sign and width == k and torch.equal(self.U[..., start:start + k], V):
                self._add_outer(V, sign)
                self._drop_block(i)
                return
            start += width
        if sign > 0 and self.overhead_flops + 2 * n * n * k + 2 * n * m * k + 2 * n * k * k >= self.refactor_flops:
            # This add alone would reach the refactorisation below, so refactor now without the
            # (m + k)² capacitance it would discard (n² · k² bytes when many keys come at once,
            # e.g. a batch of thousands of edits). Adding keys keeps A positive definite.
            self._add_outer(V, sign)
            self.refactor()
            return
        YV = cholesky_apply_inverse(self.L, V)
        cross = self.U.mT @ YV
        inner = V.mT @ YV
        inner = (inner + inner.mT) / 2 + torch.eye(k, dtype=V.dtype, device=V.device) / sign
        cap = torch.cat([torch.cat([self.cap, cross], -1), torch.cat([cross.mT, inner], -1)], -2)
        signs = self.signs + [sign] * k
        self.overhead_flops += 2 * n * n * k + 2 * n * m * k + 2 * n * k * k
        if any(s < 0 for s in signs):
            self._check_definite(cap, signs)
            self.overhead_flops += 4 * (m + k) ** 3 / 3
        self._add_outer(V, sign)
        self.U = torch.cat([self.U, V], -1)
        self.Y = torch.cat([self.Y, YV], -1)
        self.cap, self.signs = cap, signs
        self._blocks.append((k, sign))
        self._cap_solve = None
        self._maybe_refactor()

    def _add_outer(self, V: torch.Tensor, sign: int) -> None:
        # In place through (batched) GEMM: A + V Vᵀ formed out of place costs two extra passes
        # over the n × n matrix, which at n = 4096 took as long as the GEMM itself.
        n, k = self.n, V.shape[-1]
        A = self.A.view(-1, n, n)
        A.baddbmm_(V.reshape(-1, n, k), V.reshape(-1, n, k).mT, alpha=sign)

    def _check_definite(self, cap: torch.Tensor, signs: list[int]) -> None:
        # Haynsworth inertia: In(A₀ + U S Uᵀ) = In(A₀) + In(−cap) − In(−S⁻¹) with A₀ SPD, so A
        # stays positive definite iff cap has exactly as many positive eigenvalues as S.
        positive = (torch.linalg.eigvalsh(cap) > 0).sum(-1)
        if bool((positive != sum(s > 0 for s in signs)).any()):
            where = "" if self.layer is None else f" (layer {self.layer})"
            raise NotPositiveDefiniteError(
                f"removing these keys would leave {self.name}{where} indefinite: they were not "
                "all added before (accumulate(K, sign=-1) must remove keys that accumulate(K) added)",
                layer=self.layer,
            )

    def _drop_block(self, i: int) -> None:
        start = sum(width for width, _ in self._blocks[:i])
        stop = start + self._blocks[i][0]
        keep = torch.cat([torch.arange(start), torch.arange(stop, self.rank_since_refactor)]).to(self.A.device)
        self.U = self.U.index_select(-1, keep)
        self.Y = self.Y.index_select(-1, keep)
        self.cap = self.cap.index_select(-1, keep).index_select(-2, keep)
        self.signs = [s for j, s in enumerate(self.signs) if not start <= j < stop]
        del self._blocks[i]
        self._cap_solve = None

    def _capacitance_solver(self):
        if self._cap_solve is None:
            m = self.rank_since_refactor
            if all(s > 0 for s in self.signs):
                Lc = cholesky_factor(self.cap, layer=self.layer, name="Woodbury capacitance")
                self._cap_solve = lambda W: cholesky_apply_inverse(Lc, W)
                self.overhead_flops += m**3 / 3
            else:
                lu = torch.linalg.lu_factor(self.cap)
                self._cap_solve = lambda W: torch.linalg.lu_solve(*lu, W)
                self.overhead_flops += 2 * m**3 / 3
        return self._cap_solve

    def apply_inverse_flops(self, c: int) -> float:
        """FLOPs of ``apply_inverse`` on c columns in the current state."""
        n, m = self.n, self.rank_since_refactor
        flops = 2 * n * n * c
        if m:
            flops += 4 * n * m * c + 2 * m * m * c
            if self._cap_solve is None:
                flops += (1 if all(s > 0 for s in self.signs) else 2) * m**3 / 3
        return flops

    def apply_inverse(self, B: torch.Tensor) -> torch.Tensor:
        """A⁻¹ B for the current A. B (..., n, c)."""
        self._maybe_refactor()
        m, c = self.rank_since_refactor, B.shape[-1]
        if backends.pick("low_rank_solve", self.backend, B) == "ext":
            s = torch.tensor(self.signs, dtype=B.dtype, device=B.device).expand(*self.U.shape[:-2], m)
            return _ext.woodbury_solve(self.L, self.U, s, B)
        Z = cholesky_apply_inverse(self.L, B)
        if m == 0:
            return Z
        self.overhead_flops += 4 * self.n * m * c + 2 * m * m * c
        return _correct(Z, self.U, self.Y, self._capacitance_solver())

    def choose_method(self, b: int, d: int) -> str:
        """"woodbury" or "direct" for ``update_terms`` with b keys and d output rows, whichever
        costs fewer FLOPs. The final product Tᵀ Yᵀ (2·d·b·n) is common to both and left out."""
        n = self.n
        # A⁻¹K (+ low-rank correction), G = I + KᵀY, its Cholesky, G⁻¹Rᵀ
        woodbury = self.apply_inverse_flops(b) + 2 * n * b * b + b**3 / 3 + 2 * b * b * d
        # A + KKᵀ, its Cholesky, (A + KKᵀ)⁻¹K
        direct = 2 * n * n * b + n**3 / 3 + 2 * n * n * b
        return "woodbury" if woodbury <= direct else "direct"

    def update_terms(self, K: torch.Tensor, R: torch.Tensor, method: str = "auto"):
        """(T, Y) with R Kᵀ (A + K Kᵀ)⁻¹ = Tᵀ Yᵀ. K (..., n, b), R (..., d, b).

        "woodbury": Y = A⁻¹K, G = I + KᵀY, T = G⁻¹Rᵀ, from (A + KKᵀ)⁻¹K = A⁻¹K G⁻¹.
        "direct": Y = (A + KKᵀ)⁻¹K by a new factorisation, T = Rᵀ.
        "auto" takes whichever costs fewer FLOPs (``choose_method``).
        """
        if method == "auto":
            method = self.choose_method(K.shape[-1], R.shape[-2])
        b = K.shape[-1]
        if method == "woodbury":
            Y = self.apply_inverse(K)
            G = K.mT @ Y
            G = (G + G.mT) / 2 + torch.eye(b, dtype=G.dtype, device=G.device)
            LG = cholesky_factor(G, layer=self.layer, name="I + Kᵀ A⁻¹ K")
            return cholesky_apply_inverse(LG, R.mT), Y
        if method == "direct":
            L1 = cholesky_factor(self.A + K @ K.mT, layer=self.layer, jitter=self.jitter, backend=self.backend,
                                 name=f"{self.name} + K Kᵀ")
            return R.mT, cholesky_apply_inverse(L1, K)
        raise InputError(f"method must be 'auto', 'woodbury' or 'direct', got {method!r}")
