"""Backend choice of the closed-form solvers: the torch reference or the compiled extension."""
from __future__ import annotations

from fastedit import _ext
from fastedit.errors import InputError

# Ops that backend=None routes to the extension when it is built. Empty until benchmarks on
# the GPU show the extension beating the torch path (the lead decides; add the op name here).
AUTO_EXT_OPS: frozenset[str] = frozenset()


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
