"""NAS norm anchoring and the δ clamp: fastedit (one kernel launch on CUDA, vectorised torch
on CPU) against the references' one-fact-at-a-time loop.

Memory-bound ops, so each entry reports the bytes an ideal implementation moves (GB/s in the
table): norm_anchor reads v and writes scaled v, keep (1 B) and the norm (4 B) per row;
clamp_norm reads δ and the radius (4 B) and writes δ.

    pytest benchmarks/bench_norm_anchor.py --benchmark-enable     # CPU: 2000 x 1600 fp32 (full)
    (on a GPU: 2000 x 4096, the 2000-edit benchmark at Llama3/GPT-J width)
"""
import pytest
import torch

from baselines import clamp_norm_per_fact, norm_anchor_per_fact
from fastedit.linalg import clamp_norm, norm_anchor

DTYPE = torch.float32
SIZES = {
    "small": [{"n": 201, "d": 129}],
    "full": [{"n": 2000, "d": 1600}],
    "gpu": [{"n": 2000, "d": 4096}],
}


@pytest.fixture
def values(size, device):
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(size["n"], size["d"], generator=gen) * (1 + torch.rand(size["n"], 1, generator=gen))
    mu = float(v.norm(dim=-1).median()) / 1.5  # about a fifth of the rows are dropped
    return v.to(device=device, dtype=DTYPE), mu


def _info(benchmark, size, op, role, nbytes):
    benchmark.group = op
    benchmark.extra_info.update(role=role, op=op, bytes=nbytes, dtype=str(DTYPE)[6:], **size)


def _anchor_bytes(size):
    return 2 * size["n"] * size["d"] * DTYPE.itemsize + size["n"] * (1 + 4)


def _clamp_bytes(size):
    return 2 * size["n"] * size["d"] * DTYPE.itemsize + size["n"] * 4


@pytest.mark.parametrize("role", ["fastedit", "baseline"])
def test_norm_anchor(benchmark, values, size, role, timed):
    v, mu = values
    _info(benchmark, size, "norm_anchor", role, _anchor_bytes(size))
    fn = norm_anchor if role == "fastedit" else norm_anchor_per_fact
    scaled, keep = benchmark(timed(fn), v, mu)
    # The other entry of the group on the same input: both do the same work.
    ref_scaled, ref_keep = (norm_anchor_per_fact if role == "fastedit" else norm_anchor)(v, mu)
    assert torch.equal(keep.cpu(), ref_keep.cpu())
    torch.testing.assert_close(scaled, ref_scaled)


@pytest.mark.parametrize("role", ["fastedit", "baseline"])
def test_clamp_norm(benchmark, values, size, role, timed, device):
    v, mu = values
    radius = torch.full((size["n"],), mu, device=device)
    _info(benchmark, size, "clamp_norm", role, _clamp_bytes(size))
    fn = clamp_norm if role == "fastedit" else clamp_norm_per_fact
    out = benchmark(timed(fn), v, radius)
    torch.testing.assert_close(out, clamp_norm_per_fact(v, radius) if role == "fastedit" else clamp_norm(v, radius))
