"""The SYRK kernel (fastedit.kernels.syrk) against float64, under the Triton interpreter on CPU
(tiny sizes) and on a GPU when there is one.

Chunk sizes are multiples of the kernel's token block on the device at hand
(``syrk.token_block``): 16 in the interpreter, 64 for bf16/fp16 on sm_90, so a size valid
here is not hard-coded into a GPU run. Error bounds are what the hardware does (``_bound``).
"""
import pytest
import torch

from fastedit.linalg.covariance import symmetrize_lower
from fastedit.testing import assert_close, rel_error

pytest.importorskip("triton")

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
FP32_ULP = 2.0**-24


def _device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def _keys(n, d, dtype, gen, *, mean=0.5):
    return (torch.randn(n, d, generator=gen, dtype=torch.float64) + mean).to(dtype)


def _reference(x, mask):
    real = x.double()[mask] if mask is not None else x.double()
    return real.mT @ real


def _torch_fp32_error(x, mask, ref):
    """The error torch itself makes computing the same sum in fp32 (upcast keys, fp32 mm)."""
    real = x.float()[mask] if mask is not None else x.float()
    return rel_error(real.mT @ real, ref)


def _chunk(x, blocks):
    """``blocks`` token blocks of the kernel's configuration for x's dtype and device."""
    from fastedit.kernels import syrk

    return blocks * syrk.token_block(x.dtype, x.device)


def _truncation_bound(x, mask, ref, chunk_tokens):
    """Worst-case relative error of tensor-core accumulation: the products are exact, but each
    k-step of 16 products is added into the fp32 accumulator with truncation, not rounding to
    nearest (Fasi, Higham, Mikaitis, Pranesh, "Numerical behavior of NVIDIA tensor cores",
    PeerJ CS 2021), so the errors have one sign and do not cancel. Each of the min(N, chunk)/16
    additions per chunk loses at most an ulp (2⁻²³) of the step's sum and one of the
    accumulator, both bounded by Σ_t |x_ti x_tj|; in Frobenius norm relative to the sum, that is
    2 · steps · 2⁻²³ · ‖|x|ᵀ|x|‖ / ‖xᵀx‖."""
    real = x.double()[mask] if mask is not None else x.double()
    steps = -(-min(real.shape[0], chunk_tokens) // 16)
    return 2 * steps * 2.0**-23 * (real.abs().mT @ real.abs()).norm().item() / ref.norm().item()


def _bound(x, mask, ref, chunk_tokens):
    """Twice torch's own fp32 error (floored at an ulp): the kernel's products are exact (bf16,
    fp16) or rounded once (fp32, ieee), so what is left is fp32 summation error. On a GPU,
    bf16/fp16 run on tensor cores, which truncate (``_truncation_bound``)."""
    x_cpu, mask_cpu = x.cpu(), None if mask is None else mask.cpu()
    bound = 2 * max(_torch_fp32_error(x_cpu, mask_cpu, ref), FP32_ULP)
    if x.device.type == "cuda" and x.dtype in (torch.bfloat16, torch.float16):
        bound = max(bound, _truncation_bound(x_cpu, mask_cpu, ref, chunk_tokens))
    return bound


def _run(x, mask, chunk_tokens, gen):
    """Accumulate into a random float64 start whose strict upper triangle is NaN: the result's
    lower triangle must equal start + xᵀx and never depend on upper-triangle memory."""
    from fastedit.kernels import syrk

    d = x.shape[1]
    start = torch.tril(torch.randn(d, d, generator=gen, dtype=torch.float64)).to(x.device)
    s = start + torch.triu(torch.full((d, d), float("nan"), dtype=torch.float64), 1).to(x.device)
    syrk.syrk_lower_accumulate(x, s, mask, chunk_tokens=chunk_tokens)
    return symmetrize_lower(s) - symmetrize_lower(start)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n, d", [(1, 1), (37, 19), (300, 70)])
def test_syrk_matches_float64(dtype, n, d, gen):
    x = _keys(n, d, dtype, gen).to(_device())
    ref = _reference(x.cpu(), None)
    chunk = _chunk(x, 2)
    got = _run(x, None, chunk_tokens=chunk, gen=gen)
    assert_close(got, ref, _bound(x, None, ref, chunk))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_syrk_mask_skips_padding_even_nan(dtype, gen):
    n, d = 53, 21
    x = _keys(n, d, dtype, gen)
    mask = torch.rand(n, generator=gen) < 0.6
    mask[0] = True
    x[~mask] = float("nan")
    ref = _reference(x, mask)
    x, mask = x.to(_device()), mask.to(_device())
    chunk = _chunk(x, 1)
    got = _run(x, mask, chunk_tokens=chunk, gen=gen)
    assert_close(got, ref, _bound(x, mask, ref, chunk))


def test_syrk_strided_rows_and_several_flushes(gen):
    """Rows with a stride larger than d_k (a slice of wider activations) and many chunks."""
    n, d = 97, 23
    wide = _keys(n, d + 9, torch.float16, gen).to(_device())
    x = wide[:, 3:3 + d]
    assert x.stride(0) == d + 9
    ref = _reference(x.cpu(), None)
    chunk = _chunk(x, 1)
    assert n > 2 * chunk or x.device.type == "cuda", "several flushes"
    got = _run(x, None, chunk_tokens=chunk, gen=gen)
    assert_close(got, ref, _bound(x, None, ref, chunk))


def test_syrk_all_masked_adds_nothing(gen):
    from fastedit.kernels import syrk

    x = _keys(20, 17, torch.bfloat16, gen).to(_device())
    s = torch.randn(17, 17, generator=gen, dtype=torch.float64).to(_device())
    before = s.clone()
    syrk.syrk_lower_accumulate(x, s, torch.zeros(20, dtype=torch.bool, device=x.device))
    assert torch.equal(torch.tril(s), torch.tril(before))


def test_tile_order_covers_lower_triangle_once():
    from fastedit.kernels import syrk

    for n_tiles in (1, 5, 8, 19):
        pairs = syrk._tile_pairs(n_tiles, torch.device("cpu")).tolist()
        expected = {(i, j) for i in range(n_tiles) for j in range(i + 1)}
        assert len(pairs) == len(expected) and set(map(tuple, pairs)) == expected


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_syrk_gpu_sizes(dtype, gen):
    """Real tile sizes on the GPU: several tiles, an odd d_k, several default-size chunks."""
    from fastedit.kernels import syrk

    n, d = 20_011, 333
    x = _keys(n, d, dtype, gen, mean=2.0).cuda()
    mask = (torch.rand(n, generator=gen) < 0.9).cuda()
    ref = _reference(x.cpu(), mask.cpu())
    got = _run(x, mask, chunk_tokens=syrk.CHUNK_TOKENS, gen=gen).cpu()
    assert_close(got, ref, _bound(x, mask, ref, syrk.CHUNK_TOKENS))


@pytest.mark.parametrize("capability, dtype, block", [(90, torch.bfloat16, 64), (90, torch.float16, 64),
                                                      (90, torch.float32, 32), (80, torch.bfloat16, 32)])
def test_gpu_chunk_sizes_follow_the_kernel_configuration(monkeypatch, capability, dtype, block):
    """What the GPU tests will pass: the token block of the compiled kernel, not the interpreter's."""
    from fastedit.kernels import syrk

    monkeypatch.setattr(syrk, "_INTERPRETED", False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (capability // 10, 0))
    assert syrk.token_block(dtype, "cuda") == block


def _tensor_core_sum(x, k=16):
    """xᵀx as tensor cores accumulate it: exact products, each k-step's sum added into an fp32
    accumulator with round-toward-zero (simulated in float64)."""
    acc = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float32)
    x64 = x.double()
    for t in range(0, x.shape[0], k):
        exact = acc.double() + x64[t:t + k].mT @ x64[t:t + k]
        nearest = exact.float()
        toward_zero = torch.nextafter(nearest, torch.zeros_like(nearest))
        acc = torch.where(nearest.double().abs() > exact.abs(), toward_zero, nearest)
    return acc.double()


def test_truncation_bound_holds_where_round_to_nearest_does_not(gen):
    """The GPU bound of bf16/fp16 on a simulated tensor core: truncation errs far beyond twice
    torch's round-to-nearest error (the old tolerance), and stays within _truncation_bound."""
    x = _keys(4096, 8, torch.bfloat16, gen, mean=2.0)
    ref = _reference(x, None)
    err = rel_error(_tensor_core_sum(x), ref)
    assert err > 2 * max(_torch_fp32_error(x, None, ref), FP32_ULP)
    assert err <= _truncation_bound(x, None, ref, chunk_tokens=8192)
