"""The compiled extension (csrc/): a cached JIT build on first use, with a torch fallback.

Two ops, registered with ``torch.library`` in namespace ``fastedit`` (CPU and, when built
with CUDA, CUDA kernels in C++; fake implementations here, so they trace under
``torch.compile``), called through the wrappers :func:`cholesky_ex` and
:func:`woodbury_solve`. When the extension is missing, those wrappers run the torch
references beside the dispatch in the math layer,
:func:`fastedit.linalg.cholesky.cholesky_ex_torch` and
:func:`fastedit.linalg.woodbury.woodbury_solve_torch`, after one :class:`ExtensionWarning`
per process.

Why a JIT build and not a compiled wheel: building the extension inside pip's isolated build
environment would download a second multi-GB torch, so the package build is pure Python, the
sources ship as package data (``fastedit/_csrc`` in a wheel, ``csrc/`` in a checkout), and the
first :func:`load` compiles them with ninja into a cache keyed by the torch version, the Python
version, the source hash and the CUDA configuration. Importing fastedit never builds or loads
anything; ``fastedit build-ext`` builds eagerly.

Environment variables:

====================== ==================================================================
``FASTEDIT_NO_EXT=1``      never build or load the extension (no warning): torch reference ops
``FASTEDIT_REQUIRE_EXT=1`` a failed build or load raises :class:`~fastedit.errors.ExtensionError`
                           instead of warning (CI sets it)
``FASTEDIT_CACHE_DIR``     cache root (default ``~/.cache/fastedit``); the build goes to
                           ``<root>/ext/<key>``
``TORCH_CUDA_ARCH_LIST``   GPU architectures of the CUDA build (default: the visible GPUs')
====================== ==================================================================
"""
from __future__ import annotations

import hashlib
import os
import pathlib
import shutil
import sys
import threading
import time
import warnings

import torch

from fastedit.errors import ExtensionError

_NAME = "fastedit_ext"
_CPU_SOURCES = ("ops.cpp",)
_CUDA_SOURCES = ("cuda_ops.cpp", "cholesky_pivots.cu", "woodbury.cu")
_HEADERS = ("ops.h", "kernels.h")
_CFLAGS = ("-O2",)
_CUDA_CFLAGS = ("-O3",)  # the C++ standard is torch's choice, as for the host compiler
_COMPLETE = "build-complete"


class ExtensionWarning(RuntimeWarning):
    """The extension could not be built or loaded; the torch reference ops are used instead."""


def source_dir() -> pathlib.Path:
    """Where the C++/CUDA sources are: ``fastedit/_csrc`` in an installed wheel, else the
    checkout's ``csrc/`` (source tree or editable install)."""
    package = pathlib.Path(__file__).resolve().parent
    for candidate in (package / "_csrc", package.parent / "csrc"):
        if (candidate / _CPU_SOURCES[0]).is_file():
            return candidate
    raise ExtensionError(
        f"the extension sources are missing: neither {package / '_csrc'} nor {package.parent / 'csrc'}"
        " holds ops.cpp; reinstall fastedit"
    )


def cache_root() -> pathlib.Path:
    """``$FASTEDIT_CACHE_DIR``, else ``~/.cache/fastedit``."""
    root = os.environ.get("FASTEDIT_CACHE_DIR")
    return pathlib.Path(root).expanduser() if root else pathlib.Path.home() / ".cache" / "fastedit"


def _cuda_build_config() -> tuple[str | None, str]:
    """(CUDA arch list or None for a CPU-only build, why not CUDA). CUDA needs a CUDA-enabled
    torch and an nvcc (CUDA_HOME) beside it."""
    if torch.version.cuda is None:
        return None, "torch is a CPU build"
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None:
        return None, "no CUDA toolkit (nvcc) was found; set CUDA_HOME"
    arch = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if not arch and torch.cuda.is_available():
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        arch = ";".join(f"{major}.{minor}" for major, minor in caps)
    return arch or "default", ""


class _Loader:
    """Builds and loads the extension once per process; remembers a failure so that it warns
    (or raises) once and never retries a failed build in the same process."""

    def __init__(self, sources: pathlib.Path | None = None, root: pathlib.Path | None = None):
        self._sources = sources
        self._root = root
        self._lock = threading.RLock()
        self.ops = None  # torch.ops.fastedit once loaded
        self.path: pathlib.Path | None = None
        self.with_cuda = False
        self.cuda_error = ""
        self.error: str | None = None

    def build_dir(self, cuda_arch: str | None) -> pathlib.Path:
        sources = self._sources or source_dir()
        names = _CPU_SOURCES + _HEADERS + (_CUDA_SOURCES if cuda_arch else ())
        digest = hashlib.sha256()
        for name in sorted(names):
            digest.update(name.encode() + b"\0" + (sources / name).read_bytes() + b"\0")
        digest.update(repr((_CFLAGS, cuda_arch and _CUDA_CFLAGS, cuda_arch, sys.version_info[:2])).encode())
        flavour = f"cu{torch.version.cuda}" if cuda_arch else "cpu"
        torch_version = torch.__version__.split("+")[0]
        key = f"torch{torch_version}-{flavour}-py{sys.version_info[0]}{sys.version_info[1]}-{digest.hexdigest()[:16]}"
        return (self._root or cache_root()) / "ext" / key

    def _compile(self, cuda_arch: str | None, *, force: bool, verbose: bool) -> pathlib.Path:
        sources = self._sources or source_dir()
        directory = self.build_dir(cuda_arch)
        library = directory / f"{_NAME}.so"
        if force and directory.exists():
            shutil.rmtree(directory)
        if (directory / _COMPLETE).is_file() and library.is_file():
            torch.ops.load_library(str(library))
            return library
        from torch.utils import cpp_extension

        directory.mkdir(parents=True, exist_ok=True)
        print("fastedit: compiling the C++ extension (once, about a minute)...", file=sys.stderr, flush=True)
        names = _CPU_SOURCES + (_CUDA_SOURCES if cuda_arch else ())
        previous_arch = os.environ.get("TORCH_CUDA_ARCH_LIST")
        if cuda_arch and cuda_arch != "default":
            os.environ["TORCH_CUDA_ARCH_LIST"] = cuda_arch
        try:
            cpp_extension.load(
                name=_NAME,
                sources=[str(sources / name) for name in names],
                extra_cflags=list(_CFLAGS),
                extra_cuda_cflags=list(_CUDA_CFLAGS),
                build_directory=str(directory),
                verbose=verbose,
                with_cuda=bool(cuda_arch),
                is_python_module=False,
            )
        finally:
            if previous_arch is None:
                os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
            else:
                os.environ["TORCH_CUDA_ARCH_LIST"] = previous_arch
        (directory / _COMPLETE).write_text(time.strftime("%Y-%m-%dT%H:%M:%S\n"))
        return library

    def build(self, *, force: bool = False, verbose: bool = False) -> pathlib.Path:
        """Build (unless cached) and load; raise ExtensionError when no build loads. A failed
        CUDA build falls back to a CPU-only one and leaves its reason in ``cuda_error``."""
        with self._lock:
            if self.ops is not None:
                if force:
                    raise ExtensionError(
                        f"the extension is already loaded in this process from {self.path}; rebuild it "
                        "from a fresh process (`fastedit build-ext --force`)"
                    )
                return self.path
            cuda_arch, self.cuda_error = _cuda_build_config()
            try:
                self.path = self._compile(cuda_arch, force=force, verbose=verbose)
            except Exception as exc:
                if cuda_arch is None:
                    raise ExtensionError(_describe_failure(exc, "CPU")) from exc
                self.cuda_error = _describe_failure(exc, "CUDA")
                cuda_arch = None
                try:
                    self.path = self._compile(None, force=force, verbose=verbose)
                except Exception as cpu_exc:
                    raise ExtensionError(_describe_failure(cpu_exc, "CPU")) from cpu_exc
            self.with_cuda = cuda_arch is not None
            _register_fakes()
            self.ops = torch.ops.fastedit
            return self.path

    def load(self):
        if self.ops is not None or self.error is not None:
            return self.ops
        if os.environ.get("FASTEDIT_NO_EXT") == "1":
            return None
        with self._lock:
            if self.ops is not None or self.error is not None:
                return self.ops
            required = os.environ.get("FASTEDIT_REQUIRE_EXT") == "1"
            try:
                self.build()
            except ExtensionError as exc:
                self.error = str(exc)
                if required:
                    raise
                self._warn(f"{exc}; fastedit uses the torch reference ops instead (slower)")
                return None
            if torch.version.cuda is not None and not self.with_cuda:
                message = f"fastedit: CPU ops only, CUDA tensors use the torch reference ops: {self.cuda_error}"
                if required:
                    raise ExtensionError(message)
                self._warn(message)
            return self.ops

    @staticmethod
    def _warn(message: str) -> None:
        warnings.warn(
            f"{message}. Run `fastedit build-ext --verbose` for the full build log, or set "
            "FASTEDIT_NO_EXT=1 to skip the extension.",
            ExtensionWarning,
            stacklevel=4,
        )


def _describe_failure(exc: Exception, what: str) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
    diagnostic = next((line for line in lines if "error:" in line), None)
    detail = lines[0] if diagnostic in (None, lines[0]) else f"{lines[0]} ... {diagnostic}"
    return f"fastedit: the C++ extension ({what}) could not be built or loaded: {detail}"


_FAKES_REGISTERED = False


def _register_fakes() -> None:
    """Fake (meta) implementations: output shapes, dtypes and strides without computing."""
    global _FAKES_REGISTERED
    if _FAKES_REGISTERED:
        return

    @torch.library.register_fake("fastedit::cholesky_ex")
    def _cholesky_ex_fake(A):
        # torch's own fake gives L the exact layout the real at::linalg_cholesky_ex returns.
        L, info = torch.linalg.cholesky_ex(A)
        return L, info, A.new_empty(A.shape[:-2])

    @torch.library.register_fake("fastedit::woodbury_solve")
    def _woodbury_solve_fake(L, U, s, B):
        *batch, n, k = B.shape
        return B.new_empty((*batch, k, n)).transpose(-2, -1)

    _FAKES_REGISTERED = True


_LOADER = _Loader()


def load():
    """Build (first time only) and load the extension; returns ``torch.ops.fastedit`` or None.

    Never raises unless ``FASTEDIT_REQUIRE_EXT=1``; a failure warns once per process
    (:class:`ExtensionWarning`) and is not retried. ``FASTEDIT_NO_EXT=1`` returns None silently.
    """
    return _LOADER.ops if _LOADER.ops is not None else _LOADER.load()


def available() -> bool:
    """Whether the compiled ops can be used (loads the extension on first call)."""
    return load() is not None


def available_for(device: torch.device | str) -> bool:
    """Whether the compiled ops run on ``device``: CPU always once loaded; CUDA only when the
    extension was built with its CUDA sources (a CUDA-enabled torch and nvcc were found)."""
    if load() is None:
        return False
    kind = torch.device(device).type
    return kind in ("cpu", "meta") or (kind == "cuda" and _LOADER.with_cuda)


def build(*, force: bool = False, verbose: bool = False) -> pathlib.Path:
    """Build (unless cached, or always with ``force``) and load; returns the library path.
    Raises :class:`~fastedit.errors.ExtensionError` on failure whatever the environment."""
    return _LOADER.build(force=force, verbose=verbose)


# ---------------------------------------------------------------------------------------------
# Wrappers (their torch references live in fastedit.linalg)


def cholesky_ex(A: torch.Tensor):
    """Cholesky factorisation with pivot diagnostics: ``(L, info, min_pivot)``.

    A (..., n, n) float32/float64, symmetric positive definite (only its lower triangle is
    read). Returns L (..., n, n), lower with A = L Lᵀ and a zero upper part (column-major per
    matrix, like ``torch.linalg.cholesky_ex``); info (...) int32: 0 if the factorisation
    succeeded, else the 1-based column f of the first pivot that is not positive (or NaN), as
    LAPACK; min_pivot (...) in A's dtype: min_j L_jj² (the smallest pivot) for a good matrix,
    the failing pivot d_f = A_ff − Σ_{k<f} L_fk² (≤ 0 or NaN) for a failed one, +inf for n = 0.

    Kept as a compiled op for what torch lacks: torch.linalg.cholesky_ex gives neither the
    failing pivot value nor, on CUDA, a way to get the smallest pivot without extra kernels;
    the compiled op gathers both on the device without a host synchronisation, at a cost of
    one small kernel over the diagonal. CPU, float64, batch 5 (benchmarks/bench_ext.py): n = 65,
    73 µs against 69 µs for torch.linalg.cholesky_ex alone and 175 µs for the torch composition
    with the same outputs; n = 1025, within noise of both (the factorisation dominates).
    """
    # Imported here: fastedit.linalg sits above this module and must not load with it.
    from fastedit.linalg._checks import check_cholesky_input
    from fastedit.linalg.cholesky import cholesky_ex_torch

    check_cholesky_input(A)
    if available_for(A.device):
        return torch.ops.fastedit.cholesky_ex(A)
    return cholesky_ex_torch(A)


def woodbury_solve(L: torch.Tensor, U: torch.Tensor, s: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """X = (L Lᵀ + U diag(s) Uᵀ)⁻¹ B by the Woodbury identity.

    L (..., n, n) lower Cholesky factor of A0 = L Lᵀ; U (..., n, m); s (..., m) nonzero real
    weights (±1: keys added and removed); B (..., n, k); all one float dtype and device, with
    the same batch dims. m may be 0 (then X = A0⁻¹ B). With W = L⁻¹[U B], the capacitance
    S = diag(1/s) + W_Uᵀ W_U (m × m, indefinite when signs are mixed: LU) and
    X = L⁻ᵀ (W_B − W_U S⁻¹ W_Uᵀ W_B). Returns X (..., n, k), column-major per matrix. X is
    non-finite when S is exactly singular (then A0 + U diag(s) Uᵀ is singular too).

    Kept as a compiled op because it wins: the backward solve on U's m columns is never done
    (n²(m + 2k) triangular-solve flops instead of 2n²(m + k) for cholesky_solve on [U B]),
    the capacitance and Uᵀ A0⁻¹ B come from one GEMM, the subtraction is fused into it, and one
    call replaces about ten Python-dispatched ops. CPU, float64, one thread, against
    woodbury_solve_torch (benchmarks/bench_ext.py): n = 2049, m = k = 100: 48 ms vs 62 ms (median);
    n = 129, m = 7, k = 5: 55 µs vs 86 µs (min).
    """
    from fastedit.linalg._checks import check_woodbury_inputs
    from fastedit.linalg.woodbury import woodbury_solve_torch

    check_woodbury_inputs(L, U, s, B)
    if available_for(L.device):
        return torch.ops.fastedit.woodbury_solve(L, U, s, B)
    return woodbury_solve_torch(L, U, s, B)


# ---------------------------------------------------------------------------------------------
# `fastedit build-ext`


def configure(parser) -> None:
    parser.add_argument("--force", action="store_true", help="rebuild even if a cached build exists")
    parser.add_argument("--verbose", action="store_true", help="show the compiler commands and output")


def run(args) -> int:
    started = time.perf_counter()
    path = build(force=args.force, verbose=args.verbose)
    flavour = "CPU and CUDA ops" if _LOADER.with_cuda else f"CPU ops only: {_LOADER.cuda_error}"
    print(f"fastedit: extension ready in {time.perf_counter() - started:.1f} s: {path} ({flavour})")
    return 0
