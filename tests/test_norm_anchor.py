"""NAS norm anchoring, the δ norm clamp and the anchor estimate, both backends, against float64
(the Triton kernel under the interpreter on CPU, at tiny sizes)."""
import numpy as np
import pytest
import torch

from fastedit.errors import InputError
from fastedit.linalg import anchor_from_norms, clamp_norm, norm_anchor
from fastedit.testing import assert_close, rel_error

DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64]
SIZES = [(1, 1), (5, 19), (37, 70), (3, 1100)]  # 1100: two blocks of the CPU kernel


def _device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def _backends(dtype):
    """torch always; triton (the interpreter on CPU) for the dtypes the kernel takes."""
    if dtype == torch.float64:
        return ["torch"]
    pytest.importorskip("triton")
    return ["torch", "triton"]


def _anchor64(v, mu, threshold):
    v64 = v.double()
    norms = v64.norm(dim=-1)
    keep = norms <= threshold
    scaled = torch.where(keep[:, None], v64 * (mu / norms)[:, None], v64)
    return scaled, keep, norms


def _tolerance(ours_in_dtype, ref):
    """2x the error of torch doing the same computation in the input's dtype (floored at one
    fp32 ulp); float64 paths must be within 1e-12."""
    if ours_in_dtype.dtype == torch.float64:
        return 1e-12
    return 2 * max(rel_error(ours_in_dtype, ref), 2.0**-24)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n, d", SIZES)
def test_norm_anchor_matches_float64(dtype, n, d, gen):
    v = (torch.randn(n, d, generator=gen, dtype=torch.float64) * 3).to(dtype)
    norms64 = v.double().norm(dim=-1)
    # μ so that roughly a third of the rows are longer than 2μ and get dropped.
    mu = float(norms64.quantile(0.6)) / 2 if n > 1 else float(norms64[0])
    ref, keep_ref, _ = _anchor64(v, mu, 2 * mu)
    tol = _tolerance(torch.where(keep_ref[:, None], v * (mu / v.norm(dim=-1))[:, None], v), ref)
    for backend in _backends(dtype):
        out, keep, norms = norm_anchor(v.to(_device()), mu, backend=backend, return_norms=True)
        assert out.dtype == dtype and keep.dtype == torch.bool
        assert torch.equal(keep.cpu(), keep_ref), backend
        assert_close(out.cpu(), ref, tol, f"scaled v ({backend})")
        assert_close(norms.cpu(), norms64, 1e-12 if dtype == torch.float64 else 1e-6,
                     f"norms ({backend})")
        assert torch.equal(out.cpu()[~keep_ref], v[~keep_ref]), "dropped rows must be untouched"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_drop_rule_at_the_boundary(dtype):
    """‖v‖ = 2μ exactly is kept; the next representable length up is dropped."""
    if dtype == torch.bfloat16:
        up = 4.0 + 2.0**-5  # the next bf16 after 4 (torch.nextafter has no bf16 kernel)
    else:
        up = float(torch.nextafter(torch.tensor(4.0, dtype=dtype), torch.tensor(5.0, dtype=dtype)))
    v = torch.tensor([[3.0, 4.0], [3.0, up], [0.0, -5.0]], dtype=dtype)
    for backend in _backends(dtype):
        out, keep = norm_anchor(v.to(_device()), 2.5, max_ratio=2.0, backend=backend)
        assert keep.tolist() == [True, False, True], backend
        assert torch.equal(out[1].cpu(), v[1])
        expected = torch.tensor([[1.5, 2.0], [0.0, -2.5]], dtype=dtype)
        assert torch.equal(out[[0, 2]].cpu(), expected), "exact: the scale is a power of two"


def test_norm_anchor_leading_dims_and_bad_input(gen):
    v = torch.randn(2, 3, 11, generator=gen)
    out, keep = norm_anchor(v, 1.0, max_ratio=100.0)
    assert out.shape == v.shape and keep.shape == (2, 3) and bool(keep.all())
    assert_close(out.norm(dim=-1), torch.ones(2, 3), 1e-6)
    zero = v.clone()
    zero[1, 2] = 0
    with pytest.raises(InputError, match="row 5"):
        norm_anchor(zero, 1.0)
    nan = v.clone()
    nan[0, 1, 3] = float("nan")
    with pytest.raises(InputError, match="row 1"):
        norm_anchor(nan, 1.0)
    for mu in (0.0, -1.0, float("nan"), "x"):
        with pytest.raises(InputError, match="mu"):
            norm_anchor(v, mu)
    with pytest.raises(InputError, match="max_ratio"):
        norm_anchor(v, 1.0, max_ratio=0)
    with pytest.raises(InputError, match="backend"):
        norm_anchor(v, 1.0, backend="cuda")


def _clamp64(delta, radius):
    d64 = delta.double()
    norms = d64.norm(dim=-1)
    scale = torch.clamp(radius.double() / norms, max=1.0)
    scale[norms == 0] = 1.0
    return d64 * scale[:, None]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n, d", SIZES)
def test_clamp_norm_matches_float64(dtype, n, d, gen):
    delta = torch.randn(n, d, generator=gen, dtype=torch.float64).to(dtype)
    norms = delta.double().norm(dim=-1)
    radius = norms * (0.5 + torch.rand(n, generator=gen, dtype=torch.float64))  # half clamped
    ref = _clamp64(delta, radius)
    inside = norms <= radius
    for backend in _backends(dtype):
        out = clamp_norm(delta.to(_device()), radius.to(_device()), backend=backend).cpu()
        assert out.dtype == dtype
        assert torch.equal(out[inside], delta[inside]), "rows inside the ball are unchanged"
        r = radius.to(dtype)
        tol = _tolerance(delta * torch.clamp(r / delta.norm(dim=-1), max=1)[:, None], ref)
        assert_close(out, ref, tol, f"clamped delta ({backend})")


def test_clamp_norm_scalar_radius_zero_rows_and_gradients(gen):
    delta = torch.randn(4, 9, generator=gen)
    delta[2] = 0
    for backend in _backends(torch.float32):
        out = clamp_norm(delta.to(_device()), 0.5, backend=backend).cpu()
        assert torch.equal(out[2], delta[2])
        assert_close(out.norm(dim=-1)[[0, 1, 3]], torch.full((3,), 0.5), 1e-6)
        assert torch.equal(clamp_norm(delta.to(_device()), 0.0, backend=backend).cpu(),
                           torch.zeros_like(delta))
    leaf = delta.clone().requires_grad_()
    clamp_norm(leaf, 0.5).sum().backward()  # backend None takes the differentiable path
    assert leaf.grad is not None and torch.isfinite(leaf.grad).all()
    with pytest.raises(InputError, match="radius"):
        clamp_norm(delta, -1.0)
    with pytest.raises(InputError, match="radius"):
        clamp_norm(delta, torch.ones(3))


@pytest.mark.parametrize("m", [1000, 37, 19, 20, 1])
def test_anchor_from_norms_is_the_trimmed_mean(gen, m):
    # the NAS reference: drop the floor(0.05·m) largest norms, average the rest
    norms = torch.rand(m, generator=gen, dtype=torch.float64) * 10
    ranked = np.sort(norms.numpy())
    assert anchor_from_norms(norms) == pytest.approx(ranked[:m - int(0.05 * m)].mean(), rel=1e-12)
    assert anchor_from_norms(norms, trim_quantile=0.9) == pytest.approx(ranked[:m - int(round(0.1 * m, 9))].mean(),
                                                                       rel=1e-12)
    assert anchor_from_norms(norms, trim_quantile=1.0) == pytest.approx(ranked.mean(), rel=1e-12)
    if m >= 20:  # the trimmed 5% is where outliers go: one huge norm does not move the anchor
        with_outlier = norms.clone()
        with_outlier[0] = 1e9
        assert anchor_from_norms(with_outlier) < 10
    assert anchor_from_norms([3.0]) == 3.0
    for bad in ([], [1.0, float("nan")], [[1.0]]):
        with pytest.raises(InputError):
            anchor_from_norms(bad)
    with pytest.raises(InputError, match="trim_quantile"):
        anchor_from_norms(norms, trim_quantile=0)
