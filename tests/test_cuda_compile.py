"""The CUDA sources build for the GPUs fastedit targets, checked on machines without one.

Every csrc/*.cu is compiled (not linked or run) with plain nvcc for sm_80 and sm_90: the .cu
files include no torch headers, so this needs no CUDA-enabled torch. The torch-facing glue
(csrc/cuda_ops.cpp) is parsed against the installed torch's headers. Skipped without nvcc
unless FASTEDIT_REQUIRE_NVCC=1 (CI), where a missing nvcc fails.
"""
from __future__ import annotations

import os
import pathlib
import shutil
import subprocess

import pytest
import torch

from fastedit import _ext

CSRC = pathlib.Path(__file__).resolve().parent.parent / "csrc"
CUDA_SOURCES = sorted(CSRC.glob("*.cu"))
ARCHS = ("-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90")


def _nvcc() -> str:
    home = _ext.find_cuda_home()
    if home is None:
        if os.environ.get("FASTEDIT_REQUIRE_NVCC") == "1":
            pytest.fail("FASTEDIT_REQUIRE_NVCC=1 but no CUDA toolkit was found (nvcc on PATH, $CUDA_HOME, "
                        "$CUDA_PATH or /usr/local/cuda)")
        pytest.skip("no CUDA toolkit found (set FASTEDIT_REQUIRE_NVCC=1 to make this a failure)")
    return str(home / "bin" / "nvcc")


def _run(cmd: list[str]) -> None:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stdout}\n{result.stderr}"


def test_there_are_cuda_sources():
    assert CUDA_SOURCES, f"no .cu files under {CSRC}"


@pytest.mark.parametrize("source", CUDA_SOURCES, ids=[p.name for p in CUDA_SOURCES])
def test_cuda_source_compiles_for_sm80_and_sm90(source, tmp_path):
    nvcc = _nvcc()
    out = tmp_path / f"{source.stem}.o"
    _run([nvcc, "-c", "-O3", "-std=c++17", *ARCHS, f"-I{CSRC}", str(source), "-o", str(out)])
    assert out.stat().st_size > 0


def test_cuda_glue_parses_against_torch_headers(tmp_path):
    """csrc/cuda_ops.cpp is compiled only where torch has CUDA; parse it here so that a change
    of the ATen/c10 API it uses fails CI rather than the first GPU build."""
    nvcc = _nvcc()
    cxx = shutil.which(os.environ.get("CXX", "c++"))
    if cxx is None:
        pytest.skip("no C++ compiler found")
    cuda_include = pathlib.Path(nvcc).parent.parent / "include"  # find_cuda_home checked cuda_runtime.h
    torch_include = pathlib.Path(torch.__file__).parent / "include"
    # A CPU build of torch ships c10/cuda headers but not this CMake-generated one; it only
    # sets export macros, so an empty stand-in is enough for a syntax-only parse.
    shim = tmp_path / "c10" / "cuda" / "impl"
    shim.mkdir(parents=True)
    (shim / "cuda_cmake_macros.h").write_text("")
    _run([
        cxx, "-fsyntax-only", "-std=c++17", "-Wno-c++20-extensions",
        f"-I{torch_include}", f"-I{torch_include / 'torch' / 'csrc' / 'api' / 'include'}",
        f"-I{tmp_path}", f"-I{cuda_include}", f"-I{CSRC}", str(CSRC / "cuda_ops.cpp"),
    ])
