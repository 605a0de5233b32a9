"""Row rescaling by norm: NAS norm anchoring and the per-edit norm clamp, one kernel.

One program per row of a (n, d) matrix: the first pass accumulates the row's sum of squares in
fp32 (whatever the input dtype), the second writes the scaled row.

* ``norm_anchor_rows``: keep_i = ‖v_i‖ ≤ threshold (threshold = max_ratio·μ);
  out_i = v_i · μ/‖v_i‖ where kept, v_i unchanged otherwise; also returns the norms.
* ``clamp_rows``: out_i = δ_i · min(1, r_i / max(‖δ_i‖, tiny)), tiny the smallest normal
  float32, so ‖δ_i‖ = 0 gives δ_i and never 0/0.

The plain-torch references live in :mod:`fastedit.linalg.norm_anchor`, which validates inputs.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastedit.kernels import AotSpec, launch_device


@triton.jit
def _rescale_rows_kernel(
    v_ptr,
    out_ptr,
    radius_ptr,
    keep_ptr,
    norm_ptr,
    d,
    stride_v,
    stride_out,
    mu,
    threshold,
    CLAMP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    v_row = v_ptr + row * stride_v
    out_row = out_ptr + row * stride_out
    sumsq = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, d, BLOCK):
        x = tl.load(v_row + start + offs, mask=start + offs < d, other=0.0).to(tl.float32)
        sumsq += x * x
    # sqrt_rn, not the default approximate sqrt: the norm is the correctly rounded root of the
    # fp32 sum of squares, as torch's is (only the summation order differs), so an exactly
    # representable ‖v‖ = max_ratio·μ is kept by both.
    norm = tl.sqrt_rn(tl.sum(sumsq, axis=0))
    if CLAMP:
        # min(1, r/max(‖δ‖, tiny)): a zero row gets scale 1, never 0/0 (same formula as the
        # torch reference, which needs it for finite gradients at δ = 0).
        radius = tl.load(radius_ptr + row)
        scale = tl.minimum(radius / tl.maximum(norm, 1.1754943508222875e-38), 1.0)
    else:
        keep = norm <= threshold
        scale = tl.where(keep, mu / norm, 1.0)
        tl.store(keep_ptr + row, keep.to(tl.uint8))
        tl.store(norm_ptr + row, norm)
    for start in range(0, d, BLOCK):
        mask = start + offs < d
        x = tl.load(v_row + start + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_row + start + offs, (x * scale).to(out_ptr.dtype.element_ty), mask=mask)


#: True when TRITON_INTERPRET was set at import (triton.jit then made an interpreted function).
_INTERPRETED = not isinstance(_rescale_rows_kernel, triton.runtime.JITFunction)


def _block(d: int) -> int:
    # One block covers a row up to 4096 on the GPU; the interpreter's cap is lower so that the
    # tests exercise the multi-block row loop at modest d.
    return min(triton.next_power_of_2(d), 1024 if _INTERPRETED else 4096)


def _output(v: torch.Tensor) -> torch.Tensor:
    # The interpreter casts fp32 to bf16 by truncation where the GPU rounds to nearest even:
    # there the kernel writes fp32 and torch rounds, so tests see the GPU's rounding.
    if v.dtype == torch.bfloat16 and _INTERPRETED:
        return torch.empty(v.shape, dtype=torch.float32, device=v.device)
    return torch.empty_like(v)


def _launch(v: torch.Tensor, radius, keep, norms, mu: float, threshold: float,
            clamp: bool) -> torch.Tensor:
    n, d = v.shape
    assert v.stride(1) == 1
    out = _output(v)
    if n:
        block = _block(d)
        with launch_device(v.device):
            _rescale_rows_kernel[(n,)](
                v, out, radius, keep, norms, d, v.stride(0), out.stride(0), mu, threshold,
                CLAMP=clamp, BLOCK=block, num_warps=4 if block <= 1024 else 8,
            )
    return out.to(v.dtype)


def norm_anchor_rows(v: torch.Tensor, mu: float, threshold: float):
    """(out, keep, norms) for v (n, d) bf16/fp16/fp32 with unit stride along d.

    out (n, d) in v's dtype; keep (n,) bool = ‖v_i‖ ≤ threshold; norms (n,) float32.
    Rows with ‖v_i‖ = 0 come out NaN where kept: the caller rejects them (it checks norms).
    """
    n = v.shape[0]
    keep = torch.empty(n, dtype=torch.uint8, device=v.device)
    norms = torch.empty(n, dtype=torch.float32, device=v.device)
    out = _launch(v, norms, keep, norms, float(mu), float(threshold), clamp=False)
    return out, keep.view(torch.bool), norms


def clamp_rows(delta: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """δ_i · min(1, r_i/‖δ_i‖) for δ (n, d) bf16/fp16/fp32, radius (n,) float32 contiguous."""
    return _launch(delta, radius, delta, radius, 0.0, 0.0, clamp=True)


def aot_specialisations() -> list[AotSpec]:
    """Both modes, for the three input dtypes, on sm_90 and sm_80."""
    specs = []
    for capability in (90, 80):
        for name in ("bf16", "fp16", "fp32"):
            for clamp in (False, True):
                signature = {
                    "v_ptr": f"*{name}", "out_ptr": f"*{name}", "radius_ptr": "*fp32",
                    "keep_ptr": f"*{name}" if clamp else "*u8", "norm_ptr": "*fp32",
                    "d": "i32", "stride_v": "i32", "stride_out": "i32", "mu": "fp32",
                    "threshold": "fp32", "CLAMP": "constexpr", "BLOCK": "constexpr",
                }
                specs.append(AotSpec(
                    name=f"rescale_rows sm_{capability} {name} clamp={clamp}",
                    kernel=_rescale_rows_kernel, signature=signature,
                    constexprs={"CLAMP": clamp, "BLOCK": 4096}, capability=capability,
                    num_warps=8, num_stages=1,
                    aligned=("v_ptr", "out_ptr", "radius_ptr", "keep_ptr", "norm_ptr", "d",
                             "stride_v", "stride_out"),
                ))
    return specs
