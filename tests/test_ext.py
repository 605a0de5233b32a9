"""The compiled extension (csrc/, fastedit/_ext.py): build and load, both ops against float64
dense references, pivot diagnostics, torch.library checks, and the fallback's single warning.

Each semantic test runs on two backends: ``ext`` (the compiled op through torch.ops) and
``reference`` (the torch composition fastedit.linalg.backends falls back to:
``cholesky_ex_torch`` and ``woodbury_solve_torch``), so both meet one contract.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from fastedit import _ext
from fastedit.errors import ExtensionError, InputError
from fastedit.linalg.cholesky import cholesky_ex_torch
from fastedit.linalg.woodbury import woodbury_solve_torch
from fastedit.testing import assert_close, random_spd, rel_error

SIZES = (1, 6, 31, 67)
DTYPES = (torch.float64, torch.float32)


def _float32_bound(*torch_errors: float) -> float:
    """2x torch's own float32 error, floored at a few float32 ulps: where torch lands within
    an ulp by luck (n = 1, say), any other rounding order would fail a bare 2x."""
    return max(2 * max(torch_errors), 8 * torch.finfo(torch.float32).eps)


@pytest.fixture(scope="module")
def ops():
    """torch.ops.fastedit, built and loaded once for this module."""
    if os.environ.get("FASTEDIT_NO_EXT") == "1":
        pytest.skip("FASTEDIT_NO_EXT=1: the extension is deliberately not built")
    loaded = _ext.load()  # raises under FASTEDIT_REQUIRE_EXT=1 when it cannot load
    if loaded is None:
        pytest.skip(f"the extension did not build or load: {_ext._LOADER.error}")
    return loaded


@pytest.fixture(params=["ext", "reference"])
def backend(request):
    if request.param == "ext":
        ops = request.getfixturevalue("ops")
        return ops.cholesky_ex, ops.woodbury_solve
    return cholesky_ex_torch, woodbury_solve_torch


def test_builds_and_loads_on_cpu(ops):
    assert _ext.available() and _ext.available_for("cpu")
    path = _ext._LOADER.path
    assert path.is_file() and path.parent.parent.name == "ext"
    assert torch.__version__.split("+")[0] in path.parent.name
    A = torch.eye(3, dtype=torch.float64)
    L, info, min_pivot = ops.cholesky_ex(A)
    assert torch.equal(L, A) and info.item() == 0 and min_pivot.item() == 1.0


def test_import_does_not_load_the_extension():
    code = "import fastedit, fastedit._ext, torch; print(hasattr(torch.ops.fastedit, 'cholesky_ex'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


# ---------------------------------------------------------------------------------------------
# cholesky_ex


def _pivots_float64(A: torch.Tensor) -> torch.Tensor:
    """Every Cholesky pivot d_j = A_jj − A_j,<j A_<j,<j⁻¹ A_<j,j (a Schur complement), in float64,
    computed without any Cholesky factorisation."""
    A = A.double()
    n = A.shape[-1]
    pivots = [A[..., 0, 0]]
    for j in range(1, n):
        head = A[..., :j, :j]
        col = A[..., :j, j : j + 1]
        pivots.append(A[..., j, j] - (col.mT @ torch.linalg.solve(head, col))[..., 0, 0])
    return torch.stack(pivots, dim=-1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", [(), (3,), (2, 2)])
@pytest.mark.parametrize("n", SIZES)
def test_cholesky_ex_matches_float64(backend, n, batch, dtype, gen):
    cholesky_ex = backend[0]
    A64 = random_spd(n, batch=batch, cond=1e3, generator=gen)
    A = A64.to(dtype)
    L, info, min_pivot = cholesky_ex(A)
    assert L.shape == A.shape and L.dtype == dtype
    assert info.shape == batch and info.dtype == torch.int32 and min_pivot.shape == batch
    assert torch.count_nonzero(info) == 0
    assert torch.count_nonzero(torch.triu(L, diagonal=1)) == 0
    L64 = torch.linalg.cholesky(A64)
    pivots64 = torch.diagonal(L64, dim1=-2, dim2=-1) ** 2
    if dtype == torch.float64:
        assert_close(L, L64, 1e-6, "L")
        assert_close(min_pivot, pivots64.amin(-1), 1e-6, "min_pivot")
    else:
        L32 = torch.linalg.cholesky(A)
        assert_close(L, L64, _float32_bound(rel_error(L32, L64)), "L (float32)")
        torch_pivots = (torch.diagonal(L32, dim1=-2, dim2=-1) ** 2).amin(-1)
        bound = _float32_bound(rel_error(torch_pivots, pivots64.amin(-1)))
        assert_close(min_pivot, pivots64.amin(-1), bound, "min_pivot (float32)")


@pytest.mark.parametrize("dtype", DTYPES)
def test_cholesky_ex_diagnostics_in_a_batch(backend, dtype, gen):
    """Good, indefinite and NaN matrices side by side: each reports its own failing column
    (1-based) and failing pivot, checked against Schur complements computed here."""
    cholesky_ex = backend[0]
    n = 31
    A = random_spd(n, batch=(6,), cond=1e2, generator=gen)
    cols = torch.randint(2, n - 1, (4,), generator=gen).tolist()
    # 1: pivot cols[0] made negative by lowering one diagonal entry past its Schur complement.
    f = cols[0]
    A[1, f, f] -= _pivots_float64(A[1])[f] + 0.5 * A[1, f, f]
    # 2: NaN below the diagonal at (cols[1], 1): the first NaN pivot is column cols[1].
    A[2, cols[1], 1] = A[2, 1, cols[1]] = float("nan")
    # 3: NaN on the diagonal at cols[2].
    A[3, cols[2], cols[2]] = float("nan")
    # 4: negative definite: the very first pivot fails.
    A[4] = -A[4]
    # 5: NaN in the upper triangle only: never read, the matrix factors.
    A[5, 0, n - 1] = float("nan")
    A = A.to(dtype).reshape(2, 3, n, n)

    L, info, min_pivot = cholesky_ex(A)
    assert info.shape == (2, 3) and min_pivot.shape == (2, 3)
    info, min_pivot = info.reshape(6), min_pivot.reshape(6)
    assert info.tolist() == [0, cols[0] + 1, cols[1] + 1, cols[2] + 1, 1, 0]

    A64 = A.reshape(6, n, n).double()
    A64[5] = A64[5].tril() + A64[5].tril(-1).mT
    pivots = [_pivots_float64(A64[i]) for i in range(6)]
    expected_good = torch.stack([pivots[0].amin(), pivots[5].amin()])
    expected_failed = torch.stack([pivots[1][cols[0]], pivots[4][0]])
    tol = 1e-6 if dtype == torch.float64 else 1e-3
    assert_close(min_pivot[[0, 5]], expected_good, tol, "smallest pivot of the good matrices")
    assert_close(min_pivot[[1, 4]], expected_failed, tol, "failing pivot")
    assert bool((min_pivot[[1, 4]] <= 0).all())
    assert torch.isnan(min_pivot[2]) and torch.isnan(min_pivot[3])
    assert torch.isfinite(L.reshape(6, n, n)[[0, 5]]).all()


def test_cholesky_ex_empty_and_non_contiguous(backend, gen):
    cholesky_ex = backend[0]
    L, info, min_pivot = cholesky_ex(torch.zeros(2, 0, 0, dtype=torch.float64))
    assert L.shape == (2, 0, 0) and info.tolist() == [0, 0] and min_pivot.tolist() == [float("inf")] * 2
    A = random_spd(7, batch=(3,), generator=gen)
    strided = torch.stack(list(A), dim=1).transpose(0, 1)  # equal to A, batch dim not outermost
    assert not strided.is_contiguous()
    assert_close(cholesky_ex(strided)[0], torch.linalg.cholesky(strided), 1e-12, "L of a strided A")


# ---------------------------------------------------------------------------------------------
# woodbury_solve


def _woodbury_case(n, m, k, batch, gen):
    """A0 = A_keep + Σ_{s=-1} u uᵀ (so removing those keys leaves an SPD matrix), its factor L,
    U, s with mixed signs, B, and A = A0 + U diag(s) Uᵀ, all float64."""
    A_keep = random_spd(n, batch=batch, cond=1e2, generator=gen)
    U = torch.randn(*batch, n, m, dtype=torch.float64, generator=gen) / n**0.5
    s = torch.ones(*batch, m, dtype=torch.float64)
    s[..., 1::2] = -1.0
    removed = U * (s < 0).unsqueeze(-2)
    A0 = A_keep + removed @ removed.mT
    added = U * (s > 0).unsqueeze(-2)
    A = A_keep + added @ added.mT
    B = torch.randn(*batch, n, k, dtype=torch.float64, generator=gen)
    return torch.linalg.cholesky(A0), U, s, B, A


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", [(), (2,)])
@pytest.mark.parametrize("m", (0, 1, 7))
@pytest.mark.parametrize("n", SIZES)
def test_woodbury_solve_matches_dense_float64(backend, n, m, batch, dtype, gen):
    woodbury_solve = backend[1]
    L, U, s, B, A = _woodbury_case(n, m, 5, batch, gen)
    expected = torch.linalg.solve(A, B)
    args = [t.to(dtype) for t in (L, U, s, B)]
    X = woodbury_solve(*args)
    assert X.shape == B.shape and X.dtype == dtype
    if dtype == torch.float64:
        assert_close(X, expected, 1e-6, "X")
    else:
        dense32 = rel_error(torch.linalg.solve(A.to(dtype), B.to(dtype)), expected)
        composition32 = rel_error(woodbury_solve_torch(*args), expected)
        assert_close(X, expected, _float32_bound(dense32, composition32), "X (float32)")


def test_woodbury_solve_zero_columns_of_b(backend, gen):
    L, U, s, B, _ = _woodbury_case(6, 1, 0, (), gen)
    assert backend[1](L, U, s, B).shape == (6, 0)


def _pivot_cases(gen):
    """Four float64 matrices (n = 31): good, pivot 6 negative, pivot 10 NaN, good; and the
    indices of the finite ones. opcheck compares outputs with ``==``, and NaN != NaN, so it
    only gets the finite matrices (the NaN one is checked by value in the tests)."""
    A = random_spd(31, batch=(4,), cond=1e2, generator=gen)
    A[1, 5, 5] = -1.0
    A[2, 9, 3] = A[2, 3, 9] = float("nan")
    return A, [0, 1, 3]


def test_opcheck_samples_of_the_cuda_test_are_finite(ops, gen):
    A, finite = _pivot_cases(gen)
    assert torch.isfinite(A[finite]).all() and not torch.isfinite(A).all()
    for dtype in DTYPES:
        torch.library.opcheck(torch.ops.fastedit.cholesky_ex.default, (A[finite].to(dtype),))


@pytest.mark.cuda
def test_cuda_ops_match_float64_and_the_cpu_ops(ops, gen):
    if not _ext.available_for("cuda"):
        pytest.fail(f"the extension was built without its CUDA ops: {_ext._LOADER.cuda_error}")
    A, finite = _pivot_cases(gen)
    for dtype in DTYPES:
        A_d = A.to(dtype)
        L, info, min_pivot = ops.cholesky_ex(A_d.cuda())
        L_cpu, info_cpu, min_pivot_cpu = ops.cholesky_ex(A_d)
        assert info.tolist() == [0, 6, 10, 0] == info_cpu.tolist()
        tol = 1e-6 if dtype == torch.float64 else 1e-3
        assert_close(min_pivot[[0, 1, 3]], min_pivot_cpu[[0, 1, 3]], tol, "pivots on CUDA")
        assert torch.isnan(min_pivot[2])
        assert_close(L[[0, 3]], torch.linalg.cholesky(A[[0, 3]]), tol, "L on CUDA")
        torch.library.opcheck(torch.ops.fastedit.cholesky_ex.default, (A_d[finite].cuda(),))
    for m in (0, 7):
        L, U, s, B, A_dense = _woodbury_case(67, m, 5, (2,), gen)
        args = tuple(t.cuda() for t in (L, U, s, B))
        assert_close(ops.woodbury_solve(*args), torch.linalg.solve(A_dense, B), 1e-6, "X on CUDA")
        torch.library.opcheck(torch.ops.fastedit.woodbury_solve.default, args)


# ---------------------------------------------------------------------------------------------
# input checks: InputError from the linalg ops, actionable RuntimeErrors at the C++ boundary


def test_backend_ext_raises_input_error_before_the_compiled_op(gen):
    """The linalg ops check their inputs before dispatching; the thin wrappers in _ext do not."""
    from fastedit.linalg import cholesky_ex, woodbury_solve

    L, U, s, B, _ = _woodbury_case(5, 2, 3, (), gen)
    with pytest.raises(InputError, match="square"):
        cholesky_ex(torch.zeros(3, 4, dtype=torch.float64), backend="ext")
    with pytest.raises(InputError, match="floating-point"):
        cholesky_ex(torch.eye(3, dtype=torch.int64), backend="ext")
    with pytest.raises(InputError, match="float32 or float64"):
        cholesky_ex(torch.eye(3, dtype=torch.float16), backend="ext")
    with pytest.raises(InputError, match="U must have shape"):
        woodbury_solve(L, U[:4], s, B, backend="ext")
    with pytest.raises(InputError, match="s must have shape"):
        woodbury_solve(L, U, s[:1], B, backend="ext")
    with pytest.raises(InputError, match="B must have shape"):
        woodbury_solve(L, U, s, B[None], backend="ext")
    with pytest.raises(InputError, match="U has dtype torch.float32 but L has torch.float64"):
        woodbury_solve(L, U.float(), s, B, backend="ext")


def test_cpp_boundary_checks(ops, gen):
    L, U, s, B, _ = _woodbury_case(5, 2, 3, (), gen)
    with pytest.raises(RuntimeError, match="A must be a .*square"):
        ops.cholesky_ex(torch.zeros(3, 4, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="A must be float32 or float64"):
        ops.cholesky_ex(torch.eye(3, dtype=torch.float16))
    with pytest.raises(RuntimeError, match="U must have shape"):
        ops.woodbury_solve(L, U[:4], s, B)
    with pytest.raises(RuntimeError, match="s must have shape"):
        ops.woodbury_solve(L, U, s[:1], B)
    with pytest.raises(RuntimeError, match="B must have shape"):
        ops.woodbury_solve(L, U, s, B[None])
    with pytest.raises(RuntimeError, match="use one dtype"):
        ops.woodbury_solve(L, U.float(), s, B)


# ---------------------------------------------------------------------------------------------
# torch.library: schema, fake implementations, torch.compile


def test_opcheck(ops, gen):
    A = random_spd(7, batch=(2,), generator=gen)
    bad = A.clone()
    bad[1, 3, 3] = -1.0
    for sample in (A, bad, A[0].float(), A.transpose(-2, -1)):
        torch.library.opcheck(torch.ops.fastedit.cholesky_ex.default, (sample,))
    for n, m, batch, dtype in ((9, 3, (2,), torch.float64), (5, 0, (), torch.float64), (6, 1, (), torch.float32)):
        L, U, s, B, _ = _woodbury_case(n, m, 4, batch, gen)
        args = tuple(t.to(dtype) for t in (L, U, s, B))
        torch.library.opcheck(torch.ops.fastedit.woodbury_solve.default, args)


def test_torch_compile_fullgraph(ops, gen):
    L, U, s, B, A = _woodbury_case(9, 3, 4, (), gen)
    A0 = L @ L.mT

    def solve(A0, U, s, B):
        L, info, min_pivot = _ext.cholesky_ex(A0)
        return _ext.woodbury_solve(L, U, s, B), info, min_pivot

    # aot_eager: dynamo, the fake implementations and AOT tracing of the whole graph, without
    # inductor's C++ code generation (a compiler run per test on CI's two cores).
    compiled = torch.compile(solve, fullgraph=True, backend="aot_eager")
    X, info, min_pivot = compiled(A0, U, s, B)
    assert info.item() == 0 and min_pivot.item() > 0
    assert_close(X, torch.linalg.solve(A, B), 1e-6, "X through torch.compile")


# ---------------------------------------------------------------------------------------------
# the loader: one warning, or an error when required, when the build fails


def _broken_sources(tmp_path):
    sources = tmp_path / "csrc"
    sources.mkdir()
    (sources / "ops.cpp").write_text('#error "deliberately broken source for a test"\n')
    (sources / "ops.h").write_text("")
    (sources / "kernels.h").write_text("")
    return sources


def test_failed_build_warns_once_and_falls_back(tmp_path, monkeypatch):
    monkeypatch.delenv("FASTEDIT_REQUIRE_EXT", raising=False)
    monkeypatch.delenv("FASTEDIT_NO_EXT", raising=False)
    loader = _ext._Loader(sources=_broken_sources(tmp_path), root=tmp_path / "cache")
    with pytest.warns(_ext.ExtensionWarning, match="could not be built") as record:
        assert loader.load() is None
        assert loader.load() is None
    assert len([w for w in record if issubclass(w.category, _ext.ExtensionWarning)]) == 1
    assert "deliberately broken" in loader.error


def test_failed_build_raises_when_required(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTEDIT_REQUIRE_EXT", "1")
    monkeypatch.delenv("FASTEDIT_NO_EXT", raising=False)
    loader = _ext._Loader(sources=_broken_sources(tmp_path), root=tmp_path / "cache")
    with pytest.raises(ExtensionError, match="could not be built"):
        loader.load()


def test_no_ext_skips_the_build_silently(tmp_path, monkeypatch, recwarn):
    monkeypatch.setenv("FASTEDIT_NO_EXT", "1")
    loader = _ext._Loader(sources=_broken_sources(tmp_path), root=tmp_path / "cache")
    assert loader.load() is None
    assert not (tmp_path / "cache").exists()
    assert not [w for w in recwarn if issubclass(w.category, _ext.ExtensionWarning)]


def test_cli_build_ext_reports_the_library(ops, capsys):
    from fastedit.cli import main

    assert main(["build-ext"]) == 0
    out = capsys.readouterr().out
    assert str(_ext._LOADER.path) in out and "CPU" in out


# ---------------------------------------------------------------------------------------------
# the CUDA toolkit, and a failed CUDA build: recorded once, an error when required


def _fake_toolkit(root):
    """A toolkit folder (bin/nvcc answering the dry run like nvcc, include/cuda_runtime.h) and
    a wrapper script elsewhere on PATH that execs it, as on machines where torch's guess fails."""
    real = root / "cuda-13.0"
    (real / "bin").mkdir(parents=True)
    (real / "include").mkdir()
    (real / "include" / "cuda_runtime.h").write_text("")
    nvcc = real / "bin" / "nvcc"
    nvcc.write_text(f'#!/bin/sh\necho "#$ _HERE_={real / "bin"}" >&2\necho "release 13.0, V13.0.88"\n')
    nvcc.chmod(0o755)
    wrapper = root / "wrap" / "bin"
    wrapper.mkdir(parents=True)
    (wrapper / "nvcc").write_text(f'#!/bin/sh\nexec {nvcc} "$@"\n')
    (wrapper / "nvcc").chmod(0o755)
    return real, wrapper


def test_toolkit_found_through_a_wrapper_script_and_from_cuda_home(tmp_path, monkeypatch):
    real, wrapper = _fake_toolkit(tmp_path)
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", f"{wrapper}{os.pathsep}{os.environ['PATH']}")
    assert _ext.find_cuda_home() == real.resolve()
    assert _ext.nvcc_release(real.resolve()) == "release 13.0, V13.0.88"
    other, _ = _fake_toolkit(tmp_path / "other")
    monkeypatch.setenv("CUDA_PATH", str(other))
    assert _ext.find_cuda_home() == other.resolve()
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "wrap"))  # no include/: not a toolkit
    assert _ext.find_cuda_home() == other.resolve()


def _failing_cuda_compile(calls):
    """A stand-in for the compiler: the CUDA build fails as with a wrongly inferred CUDA_HOME,
    the CPU one succeeds. Records every compile; the loader's own recording code runs."""

    def compile_(self, cuda_arch, cuda_home, directory, *, verbose):
        calls.append(cuda_arch)
        if cuda_arch is not None:
            raise RuntimeError("Error building extension\nfatal error: cuda_runtime.h: No such file or directory")
        return directory / "fastedit_ext.so"

    return compile_


def test_failed_cuda_build_is_recorded_not_retried_and_fails_build_ext_when_required(tmp_path, monkeypatch, capsys):
    real, _ = _fake_toolkit(tmp_path)
    calls = []
    monkeypatch.delenv("FASTEDIT_NO_EXT", raising=False)
    monkeypatch.setattr(_ext, "_torch_has_cuda", lambda: True)
    monkeypatch.setattr(_ext, "_cuda_build_config", lambda: ("9.0", real, ""))
    monkeypatch.setattr(_ext._Loader, "_compile", _failing_cuda_compile(calls))
    root = tmp_path / "cache"

    monkeypatch.setenv("FASTEDIT_REQUIRE_EXT", "1")
    monkeypatch.setattr(_ext, "_LOADER", _ext._Loader(root=root))
    args = type("Args", (), {"force": False, "verbose": False})()
    assert _ext.run(args) == 1
    assert "cuda_runtime.h" in capsys.readouterr().err
    assert calls == ["9.0", None]

    # A later process: the recorded failure stands, no second CUDA compile, one warning.
    monkeypatch.delenv("FASTEDIT_REQUIRE_EXT")
    later = _ext._Loader(root=root)
    with pytest.warns(_ext.ExtensionWarning, match="CPU ops only.*cuda_runtime.h"):
        assert later.load() is not None
    assert calls == ["9.0", None, None] and not later.with_cuda
    assert (later.build_dir("9.0", real) / _ext._FAILED).is_file()
    # Under FASTEDIT_REQUIRE_EXT=1 the recorded failure is an error too.
    monkeypatch.setenv("FASTEDIT_REQUIRE_EXT", "1")
    with pytest.raises(ExtensionError, match="CUDA"):
        _ext._Loader(root=root).load()
    # Another toolkit is another build key: it is tried.
    other, _ = _fake_toolkit(tmp_path / "other")
    assert _ext._Loader(root=root).build_dir("9.0", real) != _ext._Loader(root=root).build_dir("9.0", other)
