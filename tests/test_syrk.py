"""The SYRK kernel (fastedit.kernels.syrk) against float64, under the Triton interpreter on CPU
(tiny sizes) and on a GPU when there is one."""
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
    got = _run(x, None, chunk_tokens=32, gen=gen)
    # bf16/fp16 products are exact in fp32 and fp32 ones (ieee) round once, so the kernel's
    # error is fp32 summation error: no worse than twice torch's fp32 mm (floored at one ulp).
    assert_close(got, ref, 2 * max(_torch_fp32_error(x.cpu(), None, ref), FP32_ULP))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_syrk_mask_skips_padding_even_nan(dtype, gen):
    n, d = 53, 21
    x = _keys(n, d, dtype, gen)
    mask = torch.rand(n, generator=gen) < 0.6
    mask[0] = True
    x[~mask] = float("nan")
    ref = _reference(x, mask)
    got = _run(x.to(_device()), mask.to(_device()), chunk_tokens=16, gen=gen)
    assert_close(got, ref, 2 * max(_torch_fp32_error(x, mask, ref), FP32_ULP))


def test_syrk_strided_rows_and_several_flushes(gen):
    """Rows with a stride larger than d_k (a slice of wider activations) and many chunks."""
    n, d = 97, 23
    wide = _keys(n, d + 9, torch.float16, gen).to(_device())
    x = wide[:, 3:3 + d]
    assert x.stride(0) == d + 9
    ref = _reference(x.cpu(), None)
    got = _run(x, None, chunk_tokens=16, gen=gen)
    assert_close(got, ref, 2 * max(_torch_fp32_error(x.cpu(), None, ref), FP32_ULP))


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
    n, d = 20_011, 333
    x = _keys(n, d, dtype, gen, mean=2.0).cuda()
    mask = (torch.rand(n, generator=gen) < 0.9).cuda()
    ref = _reference(x.cpu(), mask.cpu())
    got = _run(x, mask, chunk_tokens=8192, gen=gen).cpu()
    assert_close(got, ref, 2 * max(_torch_fp32_error(x.cpu(), mask.cpu(), ref), FP32_ULP))
