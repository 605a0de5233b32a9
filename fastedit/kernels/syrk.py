"""Covariance accumulation (SYRK, lower triangle) with two-level fp32/fp64 accumulation.

``syrk_lower_accumulate(x, s, mask)`` adds ``xᵀ diag(mask) x`` into the float64 running sum
``s`` (d_k × d_k), computing and writing only the tiles on or below the diagonal: half the
FLOPs of ``x.T @ x``. The caller symmetrises when it reads (see
:func:`fastedit.linalg.covariance.symmetrize_lower`).

Precision (the two-level accumulation):

* bf16 and fp16 inputs go through ``tl.dot`` on tensor cores. A product of two bf16 (8-bit
  significands) or fp16 (11-bit) numbers has at most 16 or 22 significant bits, so every
  product ``x_ti · x_tj`` is exact in fp32. fp32 inputs use ``input_precision="ieee"``: exact fp32
  products (FMA, no tensor cores, no tf32 rounding of the inputs).
* Within a chunk of at most ``CHUNK_TOKENS`` (T = 8192) tokens a tile accumulates in fp32:
  ``T / BLOCK_T`` additions into the accumulator, each of a ``BLOCK_T``-term hardware dot.
  Worst case, the chunk's error in entry (i, j) is at most about
  ``(T / BLOCK_T + BLOCK_T) · 2⁻²⁴ · Σ_t |x_ti x_tj|`` (≈ 1.2e-5 relative to the absolute
  sum for T = 8192, BLOCK_T = 64; typical rounding errors cancel, growing with the square
  root of the number of additions instead).
  This assumes fp32 accumulation with round-to-nearest. Tensor cores (bf16/fp16) truncate
  instead when they add each k-step of 16 products into the accumulator, so their errors do not
  cancel: up to about ``2 · (T / 16) · 2⁻²³ · Σ_t |x_ti x_tj|`` (≈ 1.2e-4 for T = 8192; the
  bound tests/test_syrk.py holds the GPU to). Both are far below the bf16 rounding of the keys
  themselves (2⁻⁹ ≈ 2e-3).
* At the end of each chunk the tile is added into the float64 sum in global memory. Each of
  those additions errs by at most 2⁻⁵³ relative, so the total error stays at the per-chunk
  bound above however many tokens are accumulated. A single fp32 running sum instead errs by
  up to ``N · 2⁻²⁴`` after N tokens: for 10⁷ tokens of keys with a non-zero mean that is all
  the digits, which is how fp32 covariance passes end with negative Cholesky pivots.

T trades error for speed: each flush reads and writes the float64 tile, 16 bytes per entry.
For d_k = 14336 and T = 8192 that is 1.6 GB per chunk over the triangle against 1.7 TFLOP of
tensor-core work: from ~5% of the chunk's time on an H100 when the programs' flushes are
spread out (one SM pulls its 256 KB tile while the others compute) to ~25% if all flushed at
once (an estimate from the H100's bandwidth and peak, not a measurement). Every launch flushes at
least once, so the covariance pass should hand each update thousands of tokens (8192 is one
batch of 16 × 512).

The token count ``n_tokens`` is not specialised (``do_not_specialize``): a new batch size does
not recompile. Masked tokens are skipped on load (their rows read as zeros, so NaN or garbage
in padding positions never reaches the sum).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from fastedit.kernels import KERNEL_DTYPES, AotSpec, launch_device

#: Tokens accumulated in fp32 before each flush into the float64 sum (see the module docstring).
CHUNK_TOKENS = 8192

#: Consecutive programs walk a band of this many tile rows column by column, so the programs
#: running at the same time share few distinct column blocks of x (L2 reuse).
_BAND_ROWS = 8


@triton.jit(do_not_specialize=["n_tokens"])
def _syrk_lower_kernel(
    x_ptr,
    mask_ptr,
    tiles_ptr,
    s_ptr,
    n_tokens,
    d_k,
    stride_xt,
    stride_s,
    HAS_MASK: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_T: tl.constexpr,
    CHUNK: tl.constexpr,
    PRECISION: tl.constexpr,
    INTERPRETED: tl.constexpr,
):
    pid = tl.program_id(0)
    tile_i = tl.load(tiles_ptr + 2 * pid)
    tile_j = tl.load(tiles_ptr + 2 * pid + 1)
    offs_i = tile_i * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_j = tile_j * BLOCK_D + tl.arange(0, BLOCK_D)
    in_i = offs_i < d_k
    in_j = offs_j < d_k
    s_ptrs = s_ptr + offs_i.to(tl.int64)[:, None] * stride_s + offs_j[None, :]
    s_mask = in_i[:, None] & in_j[None, :]
    for chunk_start in range(0, n_tokens, CHUNK):
        acc = tl.zeros((BLOCK_D, BLOCK_D), dtype=tl.float32)
        chunk_end = tl.minimum(chunk_start + CHUNK, n_tokens)
        for t0 in range(chunk_start, chunk_end, BLOCK_T):
            offs_t = t0 + tl.arange(0, BLOCK_T)
            real = offs_t < chunk_end
            if HAS_MASK:
                real = real & (tl.load(mask_ptr + offs_t, mask=real, other=0) != 0)
            # int64: tokens × stride passes 2³¹ at ~150k tokens of d_k = 14336.
            rows = x_ptr + offs_t.to(tl.int64)[:, None] * stride_xt
            a = tl.load(rows + offs_i[None, :], mask=real[:, None] & in_i[None, :], other=0.0)
            b = tl.load(rows + offs_j[None, :], mask=real[:, None] & in_j[None, :], other=0.0)
            if INTERPRETED:
                # The interpreter's tl.dot multiplies the raw bit patterns of bf16 operands
                # (triton-lang/triton#11584). fp32 holds every bf16/fp16 value exactly.
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(tl.trans(a), b, acc, input_precision=PRECISION)
        total = tl.load(s_ptrs, mask=s_mask, other=0.0) + acc.to(tl.float64)
        tl.store(s_ptrs, total, mask=s_mask)


#: True when TRITON_INTERPRET was set at import: triton.jit then made an interpreted function
#: (on CPU or CUDA tensors alike), and the launches below adapt to the interpreter.
_INTERPRETED = not isinstance(_syrk_lower_kernel, triton.runtime.JITFunction)


def _config(dtype: torch.dtype, device: torch.device) -> dict:
    """Tile sizes and launch options: (BLOCK_D, BLOCK_T, num_warps, num_stages)."""
    if _INTERPRETED:
        # The interpreter runs each block operation in numpy: few, small programs are fastest.
        return dict(BLOCK_D=32, BLOCK_T=16, num_warps=4, num_stages=1)
    return _gpu_config(dtype, torch.cuda.get_device_capability(device)[0] * 10)


def token_block(dtype: torch.dtype, device: torch.device) -> int:
    """The kernel's token block (BLOCK_T) for keys of ``dtype`` on ``device``: ``chunk_tokens``
    must be a multiple of it. It differs between the interpreter (16) and the GPUs (sm_90
    bf16/fp16: 64; fp32 and sm_80: 32), so tests derive their chunk sizes from it."""
    return _config(dtype, torch.device(device))["BLOCK_T"]


def _gpu_config(dtype: torch.dtype, capability: int) -> dict:
    if dtype == torch.float32:
        # ieee fp32 runs on FMA units; smaller tiles keep the register file from spilling.
        return dict(BLOCK_D=64, BLOCK_T=32, num_warps=4, num_stages=2)
    if capability >= 90:
        return dict(BLOCK_D=128, BLOCK_T=64, num_warps=8, num_stages=3)
    return dict(BLOCK_D=128, BLOCK_T=32, num_warps=8, num_stages=3)


@functools.lru_cache(maxsize=64)
def _tile_pairs(n_tiles: int, device: torch.device) -> torch.Tensor:
    """(P, 2) int32 (row, column) tile indices of the lower triangle, P = n(n+1)/2, in band
    order: rows grouped _BAND_ROWS at a time, each band walked column by column."""
    pairs = []
    for band in range(0, n_tiles, _BAND_ROWS):
        rows = range(band, min(band + _BAND_ROWS, n_tiles))
        for j in range(rows[-1] + 1):
            pairs.extend((i, j) for i in rows if i >= j)
    return torch.tensor(pairs, dtype=torch.int32, device=device).reshape(-1, 2)


def _precision(dtype: torch.dtype) -> str:
    # Only fp32 operands are affected: ieee keeps their products exact. For bf16/fp16 the
    # setting is moot and tl.dot's default ("tf32") is passed.
    return "ieee" if dtype == torch.float32 else "tf32"


def syrk_lower_accumulate(x: torch.Tensor, s: torch.Tensor, mask: torch.Tensor | None = None,
                          *, chunk_tokens: int = CHUNK_TOKENS) -> None:
    """s[tiles on/below the diagonal] += (xᵀ diag(mask) x)[same tiles], in place.

    Args:
        x: (N, d_k) bf16, fp16 or fp32 keys, unit stride along d_k (rows may be strided).
        s: (d_k, d_k) float64 running sum, contiguous, on x's device. Tiles strictly above the
            diagonal tiles are never read or written; within a diagonal tile both halves are.
        mask: optional (N,) bool, True for real tokens; the others contribute nothing.
        chunk_tokens: tokens accumulated in fp32 per flush into ``s`` (a multiple of the
            kernel's token block; tests lower it to exercise several flushes).

    The caller validates shapes and dtypes (fastedit.linalg.CovarianceAccumulator does); this
    launcher only asserts what the kernel itself relies on.
    """
    n_tokens, d_k = x.shape
    assert x.dtype in KERNEL_DTYPES and x.stride(1) == 1, (x.dtype, x.stride())
    assert s.dtype == torch.float64 and s.shape == (d_k, d_k) and s.is_contiguous()
    if n_tokens == 0:
        return
    cfg = _config(x.dtype, x.device)
    if chunk_tokens % cfg["BLOCK_T"]:
        raise ValueError(f"chunk_tokens={chunk_tokens} must be a multiple of {cfg['BLOCK_T']}")
    if mask is None:
        mask_arg, has_mask = x, False
    else:
        assert mask.shape == (n_tokens,) and mask.dtype == torch.bool
        mask_arg, has_mask = mask.contiguous().view(torch.uint8), True
    tiles = _tile_pairs(triton.cdiv(d_k, cfg["BLOCK_D"]), x.device)
    with launch_device(x.device):
        _syrk_lower_kernel[(tiles.shape[0],)](
            x, mask_arg, tiles, s, n_tokens, d_k, x.stride(0), s.stride(0),
            HAS_MASK=has_mask, BLOCK_D=cfg["BLOCK_D"], BLOCK_T=cfg["BLOCK_T"],
            CHUNK=chunk_tokens, PRECISION=_precision(x.dtype),
            INTERPRETED=_INTERPRETED,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )


_TL_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def aot_specialisations() -> list[AotSpec]:
    """The launches above for sm_90 and sm_80, for keys of a d_k divisible by 16 (every
    model's). The PTX must pipeline its loads (cp.async) and, for bf16/fp16, use tensor cores
    (wgmma on sm_90, mma on sm_80)."""
    specs = []
    for capability, tensor_op in ((90, "wgmma"), (80, "mma.sync")):
        for dtype, name in _TL_NAMES.items():
            cfg = _gpu_config(dtype, capability)
            # Without a mask the kernel is the masked one minus one load: both are built for
            # bf16 (what models produce), the masked one only for fp16/fp32 (CI time).
            for has_mask in (False, True) if dtype == torch.bfloat16 else (True,):
                signature = {
                    "x_ptr": f"*{name}", "mask_ptr": "*u8" if has_mask else f"*{name}",
                    "tiles_ptr": "*i32", "s_ptr": "*fp64", "n_tokens": "i32", "d_k": "i32",
                    "stride_xt": "i32", "stride_s": "i32", "HAS_MASK": "constexpr",
                    "BLOCK_D": "constexpr", "BLOCK_T": "constexpr", "CHUNK": "constexpr",
                    "PRECISION": "constexpr", "INTERPRETED": "constexpr",
                }
                constexprs = {
                    "HAS_MASK": has_mask, "BLOCK_D": cfg["BLOCK_D"], "BLOCK_T": cfg["BLOCK_T"],
                    "CHUNK": CHUNK_TOKENS, "PRECISION": _precision(dtype), "INTERPRETED": False,
                }
                specs.append(AotSpec(
                    name=f"syrk_lower sm_{capability} {name} mask={has_mask}",
                    kernel=_syrk_lower_kernel, signature=signature, constexprs=constexprs,
                    capability=capability, num_warps=cfg["num_warps"],
                    num_stages=cfg["num_stages"],
                    aligned=("x_ptr", "mask_ptr", "tiles_ptr", "s_ptr", "d_k", "stride_xt",
                             "stride_s"),
                    ptx_must_contain=("cp.async",) + (() if dtype == torch.float32
                                                      else (tensor_op,)),
                ))
    return specs
