"""Backend choice of the closed-form solvers: the torch reference or the compiled extension."""
from __future__ import annotations

from fastedit import _ext
from fastedit.errors import InputError

# Ops that backend=None routes to the extension when it is built (benchmarks/bench_ext.py, CPU,
# one thread, float64): cholesky_ex ties with torch.linalg.cholesky_ex alone (n = 65 and 1025,
# batch 5) and is 4x faster than the torch composition that adds the same pivot diagnostics
# (n = 65); woodbury_solve is 1.3x faster than woodbury_solve_torch at n = 2049, m = k = 100 and
# 1.6x (min) at n = 129, m = 7, k = 5. On a CUDA tensor with a CPU-only build the wrappers run
# the torch references. LowRankCholesky's solves are not in this set on purpose: it keeps
# Y = A0⁻¹U between calls, which the stateless compiled op would recompute on every solve.
AUTO_EXT_OPS: frozenset[str] = frozenset({"cholesky_ex", "woodbury_solve"})


def resolve_backend(backend, op: str) -> str:
    """'torch' or 'ext' for ``op`` ("cholesky_ex" or "woodbury_solve") given the user's ``backend``."""
    if backend is None:
        return "ext" if op in AUTO_EXT_OPS and _ext.available() else "torch"
    if backend == "torch":
        return "torch"
    if backend == "ext":
        if not _ext.available():
            raise InputError(
                "backend='ext' asks for the compiled extension, but it is not available in this "
                "install (not built or failed to load); build it or pass backend=None / 'torch'"
            )
        return "ext"
    raise InputError(f"backend must be None, 'torch' or 'ext', got {backend!r}")
