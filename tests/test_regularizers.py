import pytest
import torch
from _editing_world import fresh_generator

from fastedit.editing.regularizers import prune_restrain, rect, rect_mask
from fastedit.errors import InputError
from fastedit.testing import assert_close


@pytest.mark.parametrize("keep", [0.4, 0.25, 1.0])
def test_rect_keeps_exactly_the_top_fraction_of_relative_change(keep):
    gen = fresh_generator()
    d, d_k = 13, 29
    W = torch.randn(d, d_k, dtype=torch.float64, generator=gen)
    dW = torch.randn(d, d_k, dtype=torch.float64, generator=gen)
    W[0, 0] = 0.0  # relative change of a zero weight is |ΔW|/1e-8: always kept
    out = rect(dW, W, keep)
    kept = rect_mask(dW, W, keep)
    assert int(kept.sum()) == int(keep * d * d_k)
    assert kept[0, 0]
    assert torch.equal(out, torch.where(kept, dW, torch.zeros_like(dW)))
    if keep < 1:
        rel = dW.abs() / (W.abs() + 1e-8)
        # every kept entry has a relative change at least as large as every dropped one
        assert rel[kept].min() >= rel[~kept].max()


def test_rect_rejects_bad_input():
    with pytest.raises(InputError, match="same shape"):
        rect(torch.zeros(3, 4), torch.zeros(4, 3))
    with pytest.raises(InputError, match="keep"):
        rect(torch.zeros(3, 4), torch.zeros(3, 4), keep=0.0)


def test_prune_maps_large_singular_values_and_keeps_the_rest():
    gen = fresh_generator()
    d, d_k = 11, 23
    W0 = torch.randn(d, d_k, dtype=torch.float64, generator=gen)
    s0 = torch.linalg.matrix_norm(W0, ord=2)
    # a total update with known singular values, some above σ_max(W0)
    u, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(d_k, d, dtype=torch.float64, generator=gen))
    sig = torch.linspace(0.1, 4.0, d, dtype=torch.float64) * s0
    delta = (u * sig) @ v.T
    restrained, info = prune_restrain(delta, W0)
    expect_sig = torch.where(sig >= s0, torch.log(sig) - torch.log(s0) + s0, sig)
    assert_close(restrained, (u * expect_sig) @ v.T, 1e-10, "restrained ΔW")
    assert info["restrained"] == int((sig >= s0).sum()) > 0
    assert info["sigma_max_w0"] == pytest.approx(float(s0))
    got_sig = torch.linalg.svdvals(restrained)
    assert_close(got_sig, expect_sig.sort(descending=True).values, 1e-10, "singular values")
