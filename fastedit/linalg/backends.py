"""Which implementation runs each op: the one place where fastedit picks a backend.

Every op has a plain-PyTorch reference; some have a Triton kernel (:mod:`fastedit.kernels`)
or a compiled op of the C++/CUDA extension (:mod:`fastedit._ext`). The ``backend=`` argument
of every public op takes one vocabulary:

========== ==========================================================================
None       the automatic choice of the table below
``"torch"``  the plain-PyTorch reference (any device, float64 included)
``"triton"`` the op's Triton kernel: CUDA tensors, or CPU tensors under TRITON_INTERPRET=1
``"ext"``    the op's compiled op (CPU and, when built with CUDA, CUDA kernels)
========== ==========================================================================

ARCHITECTURE.md calls the compiled backend ``"cuda"``; that name is refused with a pointer to
``"ext"``, since the compiled ops run on CPU too and the Triton kernels are CUDA code as well.
A backend the op does not have, or one that cannot run on the given tensor, is an
:class:`~fastedit.errors.InputError` naming the op and its choices, never a silent fallback.

============== ============== ===============================================================
op             backends       None picks
============== ============== ===============================================================
cholesky_ex    torch, ext     ext where it runs without compiling now (CPU: loaded or already
                              built; a first-use compile there costs a minute, more than the
                              compiled ops save on CPU, see benchmarks/results); on CUDA, ext
                              built on first use; torch otherwise
woodbury_solve torch, ext     as cholesky_ex
low_rank_solve torch, ext     torch: LowRankCholesky keeps Y = A0⁻¹U between solves, which the
                              stateless compiled op would recompute on every call
covariance     torch, triton  triton (SYRK) for CUDA keys of bf16/fp16/fp32, torch otherwise
norm_anchor    torch, triton  triton for CUDA rows of bf16/fp16/fp32 that need no gradient
clamp_norm     torch, triton  as norm_anchor
============== ============== ===============================================================

A failed extension build falls back to torch (one :class:`~fastedit._ext.ExtensionWarning`,
or an error under FASTEDIT_REQUIRE_EXT=1) for backend=None and is an InputError for "ext".
"""
from __future__ import annotations

import torch

from fastedit import _ext
from fastedit.errors import InputError
from fastedit.kernels import KERNEL_DTYPES, triton_usable

#: The backends of each op besides the torch reference every op has.
OPS: dict[str, tuple[str, ...]] = {
    "cholesky_ex": ("torch", "ext"),
    "woodbury_solve": ("torch", "ext"),
    "low_rank_solve": ("torch", "ext"),
    "covariance": ("torch", "triton"),
    "norm_anchor": ("torch", "triton"),
    "clamp_norm": ("torch", "triton"),
}

#: The ops behind the solvers' single ``backend=`` (cholesky_factor, LowRankCholesky,
#: UpdateSolver, memit_solve, NullSpace).
SOLVER_OPS = ("cholesky_ex", "woodbury_solve", "low_rank_solve")


def _choices(op: str) -> str:
    return ", ".join(["None"] + [repr(b) for b in OPS[op]])


def check(backend, *ops: str, caller: str | None = None) -> str | None:
    """``backend`` if every op in ``ops`` has it (None passes), else InputError naming the
    caller, the ops and their choices. Call it where the argument is given, so a bad name fails
    there and not at the first solve."""
    if backend is None:
        return None
    if not all(isinstance(backend, str) and backend in OPS[op] for op in ops):
        who = caller or ops[0]
        what = "" if caller is None and len(ops) == 1 else f" (for {', '.join(ops)})"
        hint = (" The compiled extension is called 'ext' (it has CPU and CUDA kernels)."
                if backend == "cuda" else "")
        raise InputError(f"{who}: backend must be {_choices(ops[0])}{what}, got {backend!r}.{hint}")
    return backend


def pick(op: str, backend, x: torch.Tensor) -> str:
    """``"torch"``, ``"triton"`` or ``"ext"``: the implementation of ``op`` for tensor ``x``
    given the user's ``backend`` (see the module docstring's table)."""
    check(backend, op)
    if backend == "torch":
        return "torch"
    if backend == "ext":
        _require_ext(op, x.device)
        return "ext"
    if backend == "triton":
        _require_triton(op, x)
        return "triton"
    if op in ("cholesky_ex", "woodbury_solve"):
        return "ext" if _ext_without_compiling_on_cpu(x.device) else "torch"
    if op == "low_rank_solve":
        return "torch"
    if op in ("norm_anchor", "clamp_norm") and x.requires_grad and torch.is_grad_enabled():
        return "torch"  # the kernel records no autograd history
    return "triton" if x.device.type == "cuda" and x.dtype in KERNEL_DTYPES and triton_usable(x.device) else "torch"


def _ext_without_compiling_on_cpu(device: torch.device) -> bool:
    if device.type == "cuda":
        return _ext.available_for(device)
    return device.type == "cpu" and _ext.is_built() and _ext.available_for(device)


def _require_ext(op: str, device: torch.device) -> None:
    if _ext.available_for(device):
        return
    if not _ext.available():
        reason = _ext._LOADER.error or "FASTEDIT_NO_EXT=1"
        raise InputError(f"{op}: backend='ext' asks for the compiled extension, but it is not available "
                         f"({reason}); run `fastedit build-ext --verbose`, or pass backend=None or 'torch'")
    raise InputError(f"{op}: backend='ext' on {device}: the compiled extension was built without its CUDA "
                     f"ops ({_ext._LOADER.cuda_error}); pass backend=None or 'torch'")


def _require_triton(op: str, x: torch.Tensor) -> None:
    if not triton_usable(x.device):
        raise InputError(
            f"{op}: backend='triton' needs tensors on a CUDA device with triton installed, "
            f"or TRITON_INTERPRET=1 for the interpreter on CPU; got {x.device}. "
            f"Use backend='torch' or backend=None.")
    if x.dtype not in KERNEL_DTYPES:
        raise InputError(f"{op}: backend='triton' takes bf16, fp16 or fp32 tensors, got "
                         f"{x.dtype}; use backend='torch' or backend=None")
