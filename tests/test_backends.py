"""fastedit.linalg.backends: one vocabulary for every op's ``backend=``, a clear error for a
backend an op does not have, and no implicit extension compile on CPU."""
from __future__ import annotations

import ast
import pathlib

import pytest
import torch

from fastedit import _ext
from fastedit.errors import InputError
from fastedit.linalg import (CovarianceAccumulator, NullSpace, UpdateSolver, backends, cholesky_factor, clamp_norm,
                             memit_solve, norm_anchor)
from fastedit.testing import random_spd

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_every_op_has_the_torch_reference_and_only_known_backends():
    for op, choices in backends.OPS.items():
        assert choices[0] == "torch" and set(choices) <= {"torch", "triton", "ext"}, op


@pytest.mark.parametrize("call, names", [
    (lambda C, K, x: UpdateSolver(C, 1.0, backend="triton"), ("UpdateSolver", "'ext'")),
    (lambda C, K, x: memit_solve(C, K, 1.0, backend="cuda"), ("memit_solve", "'ext'")),
    (lambda C, K, x: NullSpace.from_covariance(C, backend="triton"), ("NullSpace", "'ext'")),
    (lambda C, K, x: cholesky_factor(C, backend="Torch"), ("cholesky_factor", "'torch'")),
    (lambda C, K, x: CovarianceAccumulator(x.shape[-1], backend="ext"), ("CovarianceAccumulator", "'triton'")),
    (lambda C, K, x: norm_anchor(x, 1.0, backend="ext"), ("norm_anchor", "'triton'")),
    (lambda C, K, x: clamp_norm(x, 1.0, backend="cuda"), ("clamp_norm", "'triton'")),
])
def test_a_backend_the_op_lacks_is_an_input_error_naming_op_and_choices(call, names, gen):
    C = random_spd(7, generator=gen)
    K = torch.randn(7, 3, dtype=torch.float64, generator=gen)
    x = torch.randn(4, 5, generator=gen)
    with pytest.raises(InputError, match="backend must be None, ") as info:
        call(C, K, x)
    for name in names:
        assert name in str(info.value)
    if "'cuda'" in str(info.value):
        assert "called 'ext'" in str(info.value)


def test_auto_on_cpu_never_compiles_the_extension(monkeypatch, tmp_path):
    """backend=None on CPU takes the extension only when it is built: a first solve must not
    turn into a minute of compiling. An explicit backend='ext' builds it."""
    monkeypatch.delenv("FASTEDIT_NO_EXT", raising=False)
    monkeypatch.delenv("FASTEDIT_REQUIRE_EXT", raising=False)
    compiled = []

    def fake_compile(self, cuda_arch, cuda_home, directory, *, verbose):
        compiled.append(cuda_arch)
        return tmp_path / "fake.so"

    monkeypatch.setattr(_ext._Loader, "_compile", fake_compile)
    monkeypatch.setattr(_ext, "_torch_has_cuda", lambda: False)
    monkeypatch.setattr(_ext, "_LOADER", _ext._Loader(root=tmp_path / "cache"))
    A = torch.eye(3, dtype=torch.float64)
    assert not _ext.is_built()
    assert backends.pick("cholesky_ex", None, A) == "torch"
    assert backends.pick("woodbury_solve", None, A) == "torch"
    assert compiled == []
    assert backends.pick("cholesky_ex", "ext", A) == "ext"
    assert compiled == [None] and _ext.is_built()
    assert backends.pick("cholesky_ex", None, A) == "ext"
    assert backends.pick("low_rank_solve", None, A) == "torch"
    assert compiled == [None]


def test_a_cached_build_counts_as_built_without_compiling(monkeypatch, tmp_path):
    monkeypatch.delenv("FASTEDIT_NO_EXT", raising=False)
    monkeypatch.setattr(_ext, "_torch_has_cuda", lambda: False)
    loader = _ext._Loader(root=tmp_path)
    assert not loader.is_built()
    directory = loader.build_dir(None)
    directory.mkdir(parents=True)
    (directory / "build-complete").write_text("now\n")
    assert loader.is_built()
    monkeypatch.setenv("FASTEDIT_NO_EXT", "1")
    assert not loader.is_built()


def test_ext_module_imports_nothing_above_it():
    """_ext sits below linalg (linalg.backends imports it): importing linalg back would be a
    cycle."""
    tree = ast.parse((ROOT / "fastedit" / "_ext.py").read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "fastedit":  # from fastedit import _io
            imported |= {f"fastedit.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
        elif isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
    # Only leaf modules, which import nothing of fastedit but errors (no cycle through linalg).
    assert {m for m in imported if m.startswith("fastedit")} <= {"fastedit.errors", "fastedit._io"}
