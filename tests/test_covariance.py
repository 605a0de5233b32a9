"""fastedit.linalg.CovarianceAccumulator: sums against float64, masks, counts, merge, the
two-level error bound, save/load, atomic writes and bad input."""
import os

import numpy as np
import pytest
import torch

from fastedit.errors import InputError
from fastedit.linalg import CovarianceAccumulator
from fastedit.testing import assert_close, rel_error

FP32_ULP = 2.0**-24


def _masked_reference(x, mask):
    rows = x.double().reshape(-1, x.shape[-1])
    if mask is not None:
        rows = rows[mask.reshape(-1)]
    return rows.mT @ rows, rows.shape[0]


def _fp32_error(x, mask, ref):
    rows = x.float().reshape(-1, x.shape[-1])
    if mask is not None:
        rows = rows[mask.reshape(-1)]
    return rel_error(rows.mT @ rows, ref)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_torch_backend_sum_mean_count(dtype, gen):
    d = 29
    x = (torch.randn(3, 41, d, generator=gen, dtype=torch.float64) + 1).to(dtype)
    mask = torch.rand(3, 41, generator=gen) < 0.7
    x[~mask] = float("nan")  # padding may hold anything: it must not reach the sum
    acc = CovarianceAccumulator(d, backend="torch")
    acc.update(x[:2], mask[:2])
    acc.update(x[2], mask[2])
    ref, count = _masked_reference(x, mask)
    tol = 1e-12 if dtype == torch.float64 else 2 * max(_fp32_error(x, mask, ref), FP32_ULP)
    assert acc.count == count
    assert torch.equal(acc.sum, acc.sum.mT) and acc.sum.dtype == torch.float64
    assert_close(acc.sum, ref, tol, "sum")
    assert_close(acc.mean(), ref / count, tol, "mean")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_blocked_torch_path_touches_only_the_lower_blocks(dtype, gen):
    """Uneven column blocks (29 = 7+7+8+7), several chunks, strict upper triangle NaN."""
    from fastedit.linalg.covariance import accumulate_lower_torch, symmetrize_lower

    n, d = 45, 29
    x = torch.randn(n, d, generator=gen, dtype=torch.float64).to(dtype)
    s = torch.tril(torch.randn(d, d, generator=gen, dtype=torch.float64))
    start = s.clone()
    s += torch.triu(torch.full((d, d), float("nan"), dtype=torch.float64), 1)
    accumulate_lower_torch(x, s, chunk_tokens=16, block=7)
    ref, _ = _masked_reference(x, None)
    tol = 1e-12 if dtype == torch.float64 else 2 * max(_fp32_error(x, None, ref), FP32_ULP)
    assert_close(symmetrize_lower(s) - symmetrize_lower(start), ref, tol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_triton_backend_matches_float64(dtype, gen):
    """The kernel path of the accumulator (interpreter on CPU: tiny sizes)."""
    pytest.importorskip("triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    d = 37
    x = (torch.randn(2, 23, d, generator=gen, dtype=torch.float64) - 0.5).to(dtype)
    mask = torch.rand(2, 23, generator=gen) < 0.8
    acc = CovarianceAccumulator(d, device=device, backend="triton")
    acc.update(x.to(device), mask.to(device))
    acc.update(x[0].to(device))
    ref_a, n_a = _masked_reference(x, mask)
    ref_b, n_b = _masked_reference(x[0], None)
    assert acc.count == n_a + n_b
    tol = 2 * max(_fp32_error(x, mask, ref_a), _fp32_error(x[0], None, ref_b), FP32_ULP)
    assert_close(acc.sum.cpu(), ref_a + ref_b, tol)


def test_two_level_sum_stays_bounded_while_fp32_running_sum_drifts(gen):
    """10⁵+ tokens of keys with a large mean: the accumulator's error does not grow with the
    token count, while a plain fp32 running sum (token by token) drifts."""
    d, small, large = 4, 2**13, 2**19
    x = (torch.randn(large, d, generator=gen) + 30).to(torch.bfloat16)

    def errors(n):
        ref = x[:n].double().mT @ x[:n].double()
        acc = CovarianceAccumulator(d, backend="torch")
        acc.update(x[:n])
        xf = x[:n].float().numpy()
        running = np.add.accumulate(xf[:, :, None] * xf[:, None, :], axis=0, dtype=np.float32)
        return rel_error(acc.sum, ref), rel_error(torch.from_numpy(running[-1]), ref)

    two_level_small, naive_small = errors(small)
    two_level_large, naive_large = errors(large)
    assert two_level_large <= 2 * two_level_small + 1e-12, (two_level_small, two_level_large)
    assert naive_large > 8 * naive_small, (naive_small, naive_large)
    assert naive_large > 100 * two_level_large, (naive_large, two_level_large)


def test_merge_equals_one_accumulator_over_the_union(gen):
    d = 19
    parts = [torch.randn(n, d, generator=gen) for n in (13, 1, 40)]
    single = CovarianceAccumulator(d)
    merged = CovarianceAccumulator(d)
    for part in parts:
        single.update(part)
        shard = CovarianceAccumulator(d)
        shard.update(part)
        merged.merge(shard)
    merged.merge(CovarianceAccumulator(d))  # an empty shard changes nothing
    assert merged.count == single.count == 54
    assert_close(merged.sum, single.sum, 1e-14)


def test_save_load_round_trip_is_bit_exact_and_resumes(tmp_path, gen):
    d = 23
    first, second = torch.randn(31, d, generator=gen), torch.randn(7, d, generator=gen)
    acc = CovarianceAccumulator(d)
    acc.update(first)
    path = tmp_path / "layer5.safetensors"
    acc.save(path, {"model": "gpt2-xl", "layer": 5, "tokens": acc.count, "bf16": True})
    loaded = CovarianceAccumulator.load(path)
    assert torch.equal(loaded.sum, acc.sum) and loaded.count == acc.count
    assert loaded.metadata == {"model": "gpt2-xl", "layer": "5", "tokens": "31", "bf16": "True"}
    acc.update(second)
    loaded.update(second)
    assert torch.equal(loaded.sum, acc.sum) and loaded.count == acc.count == 38


def test_from_sum_rebuilds_an_accumulator_that_keeps_going(gen):
    """What a data-parallel reduction does: sum per-rank sums and counts, then continue."""
    d = 11
    ranks = [CovarianceAccumulator(d) for _ in range(3)]
    for acc in ranks:
        acc.update(torch.randn(9, d, generator=gen))
    total = CovarianceAccumulator.from_sum(sum(a.sum for a in ranks), sum(a.count for a in ranks))
    more = torch.randn(5, d, generator=gen)
    total.update(more)
    expected = CovarianceAccumulator(d)
    for acc in ranks:
        expected.merge(acc)
    expected.update(more)
    assert total.count == expected.count == 32
    assert_close(total.sum, expected.sum, 1e-14)
    with pytest.raises(InputError, match="square float64"):
        CovarianceAccumulator.from_sum(torch.zeros(3, 3), 1)
    with pytest.raises(InputError, match="count"):
        CovarianceAccumulator.from_sum(torch.zeros(3, 3, dtype=torch.float64), -1)


def test_save_is_atomic(tmp_path, gen, monkeypatch):
    """A write that fails midway leaves the previous file intact and no partial file."""
    import safetensors.torch

    d = 5
    acc = CovarianceAccumulator(d)
    acc.update(torch.randn(4, d, generator=gen))
    path = tmp_path / "stats.safetensors"
    acc.save(path)
    good = path.read_bytes()
    acc.update(torch.randn(4, d, generator=gen))

    def write_half_then_fail(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", write_half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        acc.save(path)
    assert path.read_bytes() == good
    assert os.listdir(tmp_path) == [path.name]
    with pytest.raises(OSError):
        acc.save(tmp_path / "new.safetensors")
    assert os.listdir(tmp_path) == [path.name]


def test_load_rejects_foreign_and_corrupt_files(tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(InputError, match="does not exist"):
        CovarianceAccumulator.load(tmp_path / "missing.safetensors")
    foreign = tmp_path / "foreign.safetensors"
    save_file({"sum": torch.zeros(2, 2, dtype=torch.float64)}, str(foreign))
    with pytest.raises(InputError, match="not a fastedit covariance file"):
        CovarianceAccumulator.load(foreign)
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{bad")
    with pytest.raises(InputError, match="not a readable safetensors file"):
        CovarianceAccumulator.load(corrupt)


def test_bad_input_is_refused(gen, tmp_path):
    acc = CovarianceAccumulator(6)
    with pytest.raises(InputError, match="d_k=6"):
        acc.update(torch.randn(3, 5, generator=gen))
    with pytest.raises(InputError, match="mask has shape"):
        acc.update(torch.randn(2, 3, 6, generator=gen), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(InputError, match="bool"):
        acc.update(torch.randn(3, 6, generator=gen), torch.ones(3))
    with pytest.raises(InputError, match="floating-point"):
        acc.update(torch.ones(3, 6, dtype=torch.int64))
    with pytest.raises(InputError, match="no tokens"):
        acc.mean()
    with pytest.raises(InputError, match="d_k=4"):
        acc.merge(CovarianceAccumulator(4))
    with pytest.raises(InputError, match="backend"):
        CovarianceAccumulator(6, backend="cuda")
    with pytest.raises(InputError, match="d_k"):
        CovarianceAccumulator(0)
    with pytest.raises(InputError, match="metadata"):
        acc.save(tmp_path / "unused.safetensors", {"layer": [5]})
    assert acc.count == 0 and not os.listdir(tmp_path)


def test_non_finite_keys_raise_and_poison_the_accumulator(gen):
    acc = CovarianceAccumulator(6)
    acc.update(torch.randn(3, 6, generator=gen))
    x = torch.randn(4, 6, generator=gen)
    x[2, 4] = float("inf")
    with pytest.raises(InputError, match="NaN/Inf"):
        acc.update(x)
    with pytest.raises(InputError, match="NaN/Inf"):
        acc.sum
    with pytest.raises(InputError, match="NaN/Inf"):
        acc.update(torch.randn(1, 6, generator=gen))


def test_forced_triton_without_a_gpu_or_interpreter_is_refused(gen, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available: the kernel can run")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    acc = CovarianceAccumulator(3, backend="triton")
    with pytest.raises(InputError, match="TRITON_INTERPRET"):
        acc.update(torch.randn(2, 3, generator=gen))
