"""The compiled extension (csrc/): a cached JIT build, its two ops and their thin wrappers.

Two ops in namespace ``fastedit``, their schemas and fake (meta) implementations defined here
(so they trace under ``torch.compile``), their CPU and, when built with CUDA, CUDA kernels in
C++ (csrc/ registers implementations only). :func:`cholesky_ex` and :func:`woodbury_solve` are
thin ``torch.ops`` calls: they neither check inputs nor fall back. Which implementation runs,
the fallback to the torch references included, is decided in :mod:`fastedit.linalg.backends`;
this module imports nothing from fastedit above it.

Why a JIT build and not a compiled wheel: building the extension inside pip's isolated build
environment would download a second multi-GB torch, so the package build is pure Python, the
sources ship as package data (``fastedit/_csrc`` in a wheel, ``csrc/`` in a checkout), and
:func:`load` compiles them with ninja into a cache keyed by the torch version, the Python
version, the source hash and the CUDA configuration (toolkit folder, nvcc release, GPU
architectures). Importing fastedit never builds or loads anything; ``fastedit build-ext``
builds eagerly. A failed build is recorded in its cache folder, so later processes use the
recorded reason instead of compiling again (``fastedit build-ext --force`` retries).

The CUDA toolkit is found by :func:`find_cuda_home`; the environment variables that steer the
build (``FASTEDIT_NO_EXT``, ``FASTEDIT_REQUIRE_EXT``, ``FASTEDIT_CACHE_DIR``, ``CUDA_HOME``,
``TORCH_CUDA_ARCH_LIST``) are described in the README's "Environment variables" table.
"""
from __future__ import annotations

import functools
import hashlib
import os
import pathlib
import re
import shutil
import subprocess
import sys
import threading
import time
import warnings

import torch

from fastedit import _io
from fastedit.errors import ExtensionError

_NAME = "fastedit_ext"
_CPU_SOURCES = ("ops.cpp",)
_CUDA_SOURCES = ("cuda_ops.cpp", "cholesky_pivots.cu", "woodbury.cu")
_HEADERS = ("ops.h", "kernels.h")
_CFLAGS = ("-O2",)
_CUDA_CFLAGS = ("-O3",)  # the C++ standard is torch's choice, as for the host compiler
_COMPLETE = "build-complete"
_FAILED = "build-failed"
_RETRY = "`fastedit build-ext --force --verbose` retries it and shows the build log"


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


# ---------------------------------------------------------------------------------------------
# The CUDA toolkit


def _is_toolkit(root: pathlib.Path) -> bool:
    return (root / "bin" / "nvcc").is_file() and (root / "include" / "cuda_runtime.h").is_file()


def _nvcc_own_bin(nvcc: str) -> pathlib.Path | None:
    """The folder of the nvcc that ``nvcc`` really runs: a wrapper script (``exec
    /usr/local/cuda-13.0/bin/nvcc "$@"``) is not a symlink, but nvcc's dry run prints its own
    location as ``_HERE_``."""
    try:
        out = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    here = re.search(r"^#\$ _HERE_=(.+)$", out.stdout + out.stderr, re.MULTILINE)
    return pathlib.Path(here[1].strip()).resolve() if here else None


@functools.lru_cache(maxsize=8)
def _find_cuda_home(cuda_home: str, cuda_path: str, path: str) -> pathlib.Path | None:
    for env in (cuda_home, cuda_path):
        if env and _is_toolkit(pathlib.Path(env)):
            return pathlib.Path(env).resolve()
    nvcc = shutil.which("nvcc", path=path or None)
    if nvcc is not None:
        real = pathlib.Path(nvcc).resolve()
        if _is_toolkit(real.parent.parent):
            return real.parent.parent
        here = _nvcc_own_bin(nvcc)
        if here is not None and _is_toolkit(here.parent):
            return here.parent
    default = pathlib.Path("/usr/local/cuda")
    return default.resolve() if _is_toolkit(default) else None


def find_cuda_home() -> pathlib.Path | None:
    """The CUDA toolkit the extension builds with: ``$CUDA_HOME``, else ``$CUDA_PATH``, else the
    toolkit of the nvcc on PATH, found through symlinks and wrapper scripts, else
    /usr/local/cuda; a folder counts only if it holds bin/nvcc and include/cuda_runtime.h.

    torch's own guess (the parent of the folder holding the first nvcc on PATH) is wrong for a
    wrapper script such as /usr/local/bin/nvcc, and the build then fails on cuda_runtime.h.
    """
    return _find_cuda_home(os.environ.get("CUDA_HOME", ""), os.environ.get("CUDA_PATH", ""),
                           os.environ.get("PATH", ""))


@functools.lru_cache(maxsize=8)
def nvcc_release(home: pathlib.Path) -> str:
    """``release 13.0, V13.0.88`` of the toolkit's nvcc (part of the build key), or ``unknown``."""
    try:
        out = subprocess.run([str(home / "bin" / "nvcc"), "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    found = re.search(r"release [^\n]+", out.stdout)
    return found[0].strip() if found else "unknown"


def _torch_has_cuda() -> bool:
    return torch.version.cuda is not None


def _cuda_build_config() -> tuple[str | None, pathlib.Path | None, str]:
    """(CUDA arch list, toolkit root, why not CUDA): arch None for a CPU-only build. CUDA needs
    a CUDA-enabled torch and a toolkit."""
    if not _torch_has_cuda():
        return None, None, "torch is a CPU build"
    home = find_cuda_home()
    if home is None:
        return None, None, ("no CUDA toolkit (bin/nvcc and include/cuda_runtime.h) was found; set CUDA_HOME "
                            "to the toolkit's folder")
    arch = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if not arch and torch.cuda.is_available():
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        arch = ";".join(f"{major}.{minor}" for major, minor in caps)
    return arch or "default", home, ""


# ---------------------------------------------------------------------------------------------
# Build and load


class _Loader:
    """Builds and loads the extension once per process; remembers a failure so that it warns
    (or raises) once, and records it on disk so that no later process retries the same build."""

    def __init__(self, sources: pathlib.Path | None = None, root: pathlib.Path | None = None):
        self._sources = sources
        self._root = root
        self._lock = threading.RLock()
        self.ops = None  # torch.ops.fastedit once loaded
        self.path: pathlib.Path | None = None
        self.with_cuda = False
        self.cuda_error = ""
        self.error: str | None = None

    def build_dir(self, cuda_arch: str | None, cuda_home: pathlib.Path | None = None) -> pathlib.Path:
        sources = self._sources or source_dir()
        names = _CPU_SOURCES + _HEADERS + (_CUDA_SOURCES if cuda_arch else ())
        digest = hashlib.sha256()
        for name in sorted(names):
            digest.update(name.encode() + b"\0" + (sources / name).read_bytes() + b"\0")
        toolkit = (str(cuda_home), nvcc_release(cuda_home)) if cuda_arch and cuda_home else None
        digest.update(repr((_CFLAGS, cuda_arch and _CUDA_CFLAGS, cuda_arch, toolkit, sys.version_info[:2])).encode())
        flavour = f"cu{torch.version.cuda}" if cuda_arch else "cpu"
        torch_version = torch.__version__.split("+")[0]
        key = f"torch{torch_version}-{flavour}-py{sys.version_info[0]}{sys.version_info[1]}-{digest.hexdigest()[:16]}"
        return (self._root or _io.cache_root()) / "ext" / key

    def is_built(self) -> bool:
        """Whether loading needs no compiler: loaded already, or a complete build of the
        configuration this process would build sits in the cache."""
        if self.ops is not None:
            return True
        if os.environ.get("FASTEDIT_NO_EXT") == "1" or self.error is not None:
            return False
        cuda_arch, cuda_home, _ = _cuda_build_config()
        for arch, home in ((cuda_arch, cuda_home), (None, None)) if cuda_arch else ((None, None),):
            directory = self.build_dir(arch, home)
            if (directory / _COMPLETE).is_file():
                return True
            if not (directory / _FAILED).is_file():
                return False  # this build would be tried first: it needs the compiler
        return False

    def _build_one(self, cuda_arch: str | None, cuda_home: pathlib.Path | None, *, force: bool,
                   verbose: bool) -> pathlib.Path:
        """Load one build configuration, compiling it unless cached; a failure is recorded in
        its folder and raised again (without compiling) until ``force`` clears it."""
        directory = self.build_dir(cuda_arch, cuda_home)
        failed = directory / _FAILED
        if force and directory.exists():
            shutil.rmtree(directory)
        if failed.is_file():
            raise ExtensionError(f"{failed.read_text().strip()} (recorded in {failed}; {_RETRY})")
        try:
            return self._compile(cuda_arch, cuda_home, directory, verbose=verbose)
        except Exception as exc:
            message = _describe_failure(exc, "CUDA" if cuda_arch else "CPU")
            directory.mkdir(parents=True, exist_ok=True)
            failed.write_text(message + "\n")
            raise ExtensionError(f"{message} ({_RETRY})") from exc

    def _compile(self, cuda_arch: str | None, cuda_home: pathlib.Path | None, directory: pathlib.Path, *,
                 verbose: bool) -> pathlib.Path:
        sources = self._sources or source_dir()
        library = directory / f"{_NAME}.so"
        _define_ops()
        if (directory / _COMPLETE).is_file() and library.is_file():
            torch.ops.load_library(str(library))
            return library
        from torch.utils import cpp_extension

        directory.mkdir(parents=True, exist_ok=True)
        print("fastedit: compiling the C++ extension (once, about a minute)...", file=sys.stderr, flush=True)
        names = _CPU_SOURCES + (_CUDA_SOURCES if cuda_arch else ())
        saved_env = {k: os.environ.get(k) for k in ("TORCH_CUDA_ARCH_LIST", "CUDA_HOME")}
        saved_home = cpp_extension.CUDA_HOME
        if cuda_arch and cuda_arch != "default":
            os.environ["TORCH_CUDA_ARCH_LIST"] = cuda_arch
        if cuda_home is not None:
            # torch fixed its CUDA_HOME at import, from the first nvcc on PATH.
            os.environ["CUDA_HOME"] = cpp_extension.CUDA_HOME = str(cuda_home)
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
            cpp_extension.CUDA_HOME = saved_home
            for k, v in saved_env.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        (directory / _COMPLETE).write_text(time.strftime("%Y-%m-%dT%H:%M:%S\n"))
        return library

    def build(self, *, force: bool = False, verbose: bool = False) -> pathlib.Path:
        """Build (unless cached) and load; raise ExtensionError when no build loads. A failed
        CUDA build falls back to a CPU-only one and leaves its reason in ``cuda_error``; with
        FASTEDIT_REQUIRE_EXT=1 a CUDA-enabled torch without the CUDA ops is an error."""
        with self._lock:
            if self.ops is not None:
                if force:
                    raise ExtensionError(
                        f"the extension is already loaded in this process from {self.path}; rebuild it "
                        "from a fresh process (`fastedit build-ext --force`)"
                    )
                return self.path
            cuda_arch, cuda_home, self.cuda_error = _cuda_build_config()
            try:
                self.path = self._build_one(cuda_arch, cuda_home, force=force, verbose=verbose)
            except ExtensionError as exc:
                if cuda_arch is None:
                    raise
                self.cuda_error = str(exc)
                cuda_arch = None
                self.path = self._build_one(None, None, force=force, verbose=verbose)
            self.with_cuda = cuda_arch is not None
            self.ops = torch.ops.fastedit
            if _torch_has_cuda() and not self.with_cuda and _required():
                raise ExtensionError(f"fastedit: CPU ops only (FASTEDIT_REQUIRE_EXT=1 asks for the CUDA ops "
                                     f"too): {self.cuda_error}")
            return self.path

    def load(self):
        if self.ops is not None or self.error is not None:
            return self.ops
        if os.environ.get("FASTEDIT_NO_EXT") == "1":
            return None
        with self._lock:
            if self.ops is not None or self.error is not None:
                return self.ops
            try:
                self.build()
            except ExtensionError as exc:
                if self.ops is not None:  # CPU ops loaded, CUDA ones missing: required
                    raise
                self.error = str(exc)
                if _required():
                    raise
                self._warn(f"{exc}; fastedit uses the torch reference ops instead (slower)")
                return None
            if _torch_has_cuda() and not self.with_cuda:
                self._warn(f"fastedit: CPU ops only, CUDA tensors use the torch reference ops: {self.cuda_error}")
            return self.ops

    @staticmethod
    def _warn(message: str) -> None:
        warnings.warn(f"{message}. Set FASTEDIT_NO_EXT=1 to skip the extension.", ExtensionWarning, stacklevel=4)


def _required() -> bool:
    return os.environ.get("FASTEDIT_REQUIRE_EXT") == "1"


def _describe_failure(exc: Exception, what: str) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
    diagnostic = next((line for line in lines if "error:" in line), None)
    detail = lines[0] if diagnostic in (None, lines[0]) else f"{lines[0]} ... {diagnostic}"
    return f"fastedit: the C++ extension ({what}) could not be built or loaded: {detail}"


_LOADER = _Loader()


def load():
    """Build (unless cached or recorded as failed) and load the extension; returns
    ``torch.ops.fastedit`` or None.

    Never raises unless ``FASTEDIT_REQUIRE_EXT=1``; a failure warns once per process
    (:class:`ExtensionWarning`) and is not retried. ``FASTEDIT_NO_EXT=1`` returns None silently.
    """
    return _LOADER.ops if _LOADER.ops is not None else _LOADER.load()


def is_built() -> bool:
    """Whether the extension is loaded, or can be loaded without compiling anything."""
    return _LOADER.is_built()


def available() -> bool:
    """Whether the compiled ops can be used (builds and loads the extension on first call)."""
    return load() is not None


def available_for(device: torch.device | str) -> bool:
    """Whether the compiled ops run on ``device`` (builds and loads on first call): CPU always
    once loaded; CUDA only when the extension was built with its CUDA sources."""
    if load() is None:
        return False
    kind = torch.device(device).type
    return kind in ("cpu", "meta") or (kind == "cuda" and _LOADER.with_cuda)


def build(*, force: bool = False, verbose: bool = False) -> pathlib.Path:
    """Build (unless cached, or always with ``force``) and load; returns the library path.
    Raises :class:`~fastedit.errors.ExtensionError` on failure whatever the environment."""
    return _LOADER.build(force=force, verbose=verbose)


# ---------------------------------------------------------------------------------------------
# The ops: schema, fake implementation and thin wrapper of each

_SCHEMAS = (
    "cholesky_ex(Tensor A) -> (Tensor L, Tensor info, Tensor min_pivot)",
    "woodbury_solve(Tensor L, Tensor U, Tensor s, Tensor B) -> Tensor",
)
_LIBRARY: torch.library.Library | None = None


def _cholesky_ex_fake(A):
    # torch's own fake gives L the exact layout the real at::linalg_cholesky_ex returns.
    L, info = torch.linalg.cholesky_ex(A)
    return L, info, A.new_empty(A.shape[:-2])


def _woodbury_solve_fake(L, U, s, B):
    *batch, n, k = B.shape
    return B.new_empty((*batch, k, n)).transpose(-2, -1)


def _define_ops() -> None:
    """Define the schemas and fakes once per process, before the library registers kernels."""
    global _LIBRARY
    if _LIBRARY is not None:
        return
    library = torch.library.Library("fastedit", "DEF")
    for schema in _SCHEMAS:
        library.define(schema)
    torch.library.register_fake("fastedit::cholesky_ex", _cholesky_ex_fake, lib=library)
    torch.library.register_fake("fastedit::woodbury_solve", _woodbury_solve_fake, lib=library)
    _LIBRARY = library


def _ops():
    ops = load()
    if ops is None:
        raise ExtensionError(f"the compiled extension is not available ({_LOADER.error or 'FASTEDIT_NO_EXT=1'}); "
                             "call fastedit.linalg's ops, which fall back to the torch references")
    return ops


def cholesky_ex(A: torch.Tensor):
    """Cholesky factorisation with pivot diagnostics: ``(L, info, min_pivot)``.

    A (..., n, n) float32/float64, symmetric positive definite (only its lower triangle is
    read). Returns L (..., n, n), lower with A = L Lᵀ and a zero upper part (column-major per
    matrix, like ``torch.linalg.cholesky_ex``); info (...) int32: 0 if the factorisation
    succeeded, else the 1-based column f of the first pivot that is not positive (or NaN), as
    LAPACK; min_pivot (...) in A's dtype: min_j L_jj² (the smallest pivot) for a good matrix,
    the failing pivot d_f = A_ff − Σ_{k<f} L_fk² (≤ 0 or NaN) for a failed one, +inf for n = 0.

    A compiled op for what torch lacks: torch.linalg.cholesky_ex gives neither the failing
    pivot value nor, on CUDA, the smallest pivot without extra kernels; the op gathers both on
    the device without a host synchronisation. Inputs are checked by the caller
    (:func:`fastedit.linalg.cholesky_ex`); the C++ boundary raises RuntimeError.
    """
    return _ops().cholesky_ex(A)


def woodbury_solve(L: torch.Tensor, U: torch.Tensor, s: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """X = (L Lᵀ + U diag(s) Uᵀ)⁻¹ B by the Woodbury identity.

    L (..., n, n) lower Cholesky factor of A0 = L Lᵀ; U (..., n, m); s (..., m) nonzero real
    weights (±1: keys added and removed); B (..., n, k); all one float dtype and device, with
    the same batch dims. m may be 0 (then X = A0⁻¹ B). With W = L⁻¹[U B], the capacitance
    S = diag(1/s) + W_Uᵀ W_U (m × m, indefinite when signs are mixed: LU) and
    X = L⁻ᵀ (W_B − W_U S⁻¹ W_Uᵀ W_B). Returns X (..., n, k), column-major per matrix. X is
    non-finite when S is exactly singular (then A0 + U diag(s) Uᵀ is singular too).

    A compiled op because the backward solve on U's m columns is never done (n²(m + 2k)
    triangular-solve flops instead of 2n²(m + k) for cholesky_solve on [U B]), the capacitance
    and Uᵀ A0⁻¹ B come from one GEMM with the subtraction fused into it, and one call replaces
    about ten Python-dispatched ops (measured in benchmarks/bench_ext.py). Inputs are checked by
    the caller (:func:`fastedit.linalg.woodbury_solve`).
    """
    return _ops().woodbury_solve(L, U, s, B)


# ---------------------------------------------------------------------------------------------
# `fastedit build-ext`


def configure(parser) -> None:
    parser.add_argument("--force", action="store_true",
                        help="rebuild even if a cached (or a recorded failed) build exists")
    parser.add_argument("--verbose", action="store_true", help="show the compiler commands and output")


def run(args) -> int:
    started = time.perf_counter()
    try:
        path = build(force=args.force, verbose=args.verbose)
    except ExtensionError as exc:
        print(f"fastedit build-ext: error: {exc}", file=sys.stderr)
        return 1
    flavour = "CPU and CUDA ops" if _LOADER.with_cuda else f"CPU ops only: {_LOADER.cuda_error}"
    print(f"fastedit: extension ready in {time.perf_counter() - started:.1f} s: {path} ({flavour})")
    return 0
