"""Triton kernels: one file per kernel family, launch wrappers only.

Nothing here imports triton at package import; each kernel module imports it itself, so
fastedit works where triton is absent (the torch references are used instead).

Every kernel module lists the specialisations it launches in ``aot_specialisations()``
(a list of :class:`AotSpec`); tests/test_aot_compile.py compiles each of them ahead of time
for sm_90 and sm_80 and fails for a module or ``@triton.jit`` function that is not covered.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from typing import Any, NamedTuple

import torch


#: Kernel modules of this package (the AOT test also checks this list against the files).
KERNEL_MODULES = ("fastedit.kernels.syrk", "fastedit.kernels.norm_anchor")


class AotSpec(NamedTuple):
    """One ahead-of-time compile job: ``triton.compile(ASTSource(kernel, signature, constexprs,
    attrs), target=GPUTarget("cuda", capability, 32), options={"num_warps", "num_stages"})``.

    ``aligned`` names the arguments a real launch sees 16-byte aligned (pointers) or divisible
    by 16 (sizes, strides): the JIT specialises on that, and without it the compiler neither
    vectorises nor pipelines loads, so the AOT build would not be the code that runs.
    ``ptx_must_contain`` names instructions the PTX must use (e.g. ``"wgmma"``): the test fails
    if the compiler silently took a slower path.
    """

    name: str
    kernel: Any
    signature: dict
    constexprs: dict
    capability: int
    num_warps: int
    num_stages: int
    aligned: tuple = ()
    ptx_must_contain: tuple = ()


def interpreter_enabled() -> bool:
    """True when TRITON_INTERPRET asks Triton to run kernels on the CPU (tests without a GPU)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=1)
def _triton_installed() -> bool:
    # find_spec searches sys.path (~0.2 ms) and the answer cannot change within a process.
    return importlib.util.find_spec("triton") is not None


def triton_usable(device: torch.device) -> bool:
    """Whether a Triton kernel can run on tensors of ``device``: triton is installed and the
    device is CUDA, or the Triton interpreter is on (then CPU tensors work too)."""
    if not _triton_installed():
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and interpreter_enabled()


def launch_device(device: torch.device):
    """Context making ``device`` current for a launch: Triton launches on the current CUDA
    device, which need not be the tensors' (cuda:1 tensors while cuda:0 is current)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


#: Input dtypes the kernels of this package take; other dtypes (float64) use the torch path.
KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

