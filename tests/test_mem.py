"""fastedit._mem.trim: hands freed host pages back between chunks, changes no value."""
import sys

import pytest
import torch

from fastedit import _mem


def _rss_kb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def test_trim_changes_no_value_and_skips_cuda_tensors(monkeypatch):
    x = torch.randn(257, 33, dtype=torch.float64)
    before = x.clone()
    _mem.trim()
    _mem.trim(torch.device("cpu"))
    assert torch.equal(x, before)
    calls = []
    monkeypatch.setattr(_mem, "_trim", lambda pad: calls.append(pad))
    _mem.trim(torch.device("cuda"))  # the caching allocator's blocks are not the host heap's
    _mem.trim(torch.device("cpu"))
    assert calls == [0]


@pytest.mark.skipif(not sys.platform.startswith("linux") or _mem._trim is None, reason="glibc only")
def test_trim_returns_freed_heap_pages():
    # Many blocks under the mmap threshold land in the heap; freed, they stay resident until trimmed.
    blocks = [bytearray(64 * 1024) for _ in range(1600)]  # ~100 MB
    keep = blocks[-1]
    del blocks
    high = _rss_kb()
    _mem.trim()
    assert _rss_kb() < high - 50 * 1024, "malloc_trim gave back less than half of the ~100 MB freed"
    del keep
