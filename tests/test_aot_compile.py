"""Every Triton kernel of the package compiles ahead of time for sm_90 and sm_80 (no GPU
needed), with the alignment a real launch has (the form of triton/tools/compile.py), and the
SYRK kernel's PTX pipelines its loads and uses tensor cores (wgmma on sm_90, mma on sm_80)
for bf16/fp16 keys.

The compiles run in a subprocess without TRITON_INTERPRET: under the interpreter (which
tests/conftest.py turns on without a GPU) ``triton.jit`` returns interpreted functions that
cannot be compiled.
"""
import json
import os
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("triton")

from fastedit.kernels import KERNEL_MODULES  # noqa: E402

KERNELS_DIR = pathlib.Path(__file__).resolve().parent.parent / "fastedit" / "kernels"

_COMPILE_ALL = r"""
import importlib, json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

reports = {}
for module_name in sys.argv[1:]:
    module = importlib.import_module(module_name)
    kernels = sorted(name for name, obj in vars(module).items() if isinstance(obj, JITFunction))
    results = []
    for spec in module.aot_specialisations():
        attrs = {(spec.kernel.arg_names.index(name),): [["tt.divisibility", 16]]
                 for name in spec.aligned}
        src = ASTSource(fn=spec.kernel, signature=spec.signature, constexprs=spec.constexprs,
                        attrs=attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", spec.capability, 32),
                                  options={"num_warps": spec.num_warps,
                                           "num_stages": spec.num_stages})
        ptx = compiled.asm["ptx"]
        results.append({
            "name": spec.name, "kernel": spec.kernel.__name__, "capability": spec.capability,
            "missing": [op for op in spec.ptx_must_contain if op not in ptx],
            "wgmma": "wgmma.mma_async" in ptx, "mma": "mma.sync" in ptx,
            "not_specialised": [p.name for p in spec.kernel.params if p.do_not_specialize],
        })
    reports[module_name] = {"kernels": kernels, "results": results}
print(json.dumps(reports))
"""


def test_every_kernel_module_is_listed():
    on_disk = {f"fastedit.kernels.{p.stem}" for p in KERNELS_DIR.glob("*.py")
               if p.stem != "__init__"}
    assert on_disk == set(KERNEL_MODULES), "add new kernel modules to KERNEL_MODULES"


@pytest.fixture(scope="module")
def compiled():
    # One subprocess for all modules: each pays the Python + torch + triton start-up.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", _COMPILE_ALL, *KERNEL_MODULES], env=env,
                         capture_output=True, text=True)
    assert run.returncode == 0, f"a kernel module failed to compile:\n{run.stderr[-4000:]}"
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("module", KERNEL_MODULES)
def test_every_kernel_compiles_for_sm90_and_sm80(module, compiled):
    report = compiled[module]
    assert report["kernels"], f"{module} defines no @triton.jit kernel"
    for kernel in report["kernels"]:
        targets = {r["capability"] for r in report["results"] if r["kernel"] == kernel}
        assert targets == {80, 90}, f"{module}.{kernel} is compiled for {sorted(targets)}"
    failed = {r["name"]: r["missing"] for r in report["results"] if r["missing"]}
    assert not failed, f"PTX lacks the required instructions: {failed}"


def test_syrk_uses_tensor_cores_and_does_not_specialise_the_token_count(compiled):
    results = compiled["fastedit.kernels.syrk"]["results"]
    for capability, tensor_op in ((90, "wgmma"), (80, "mma")):
        for dtype in ("bf16", "fp16"):
            specs = [r for r in results
                     if r["capability"] == capability and f" {dtype} " in r["name"]]
            assert specs, f"no sm_{capability} {dtype} specialisation of the SYRK kernel"
            assert all(r[tensor_op] for r in specs), f"sm_{capability} {dtype}: no {tensor_op}"
    assert all(r["not_specialised"] == ["n_tokens"] for r in results)
