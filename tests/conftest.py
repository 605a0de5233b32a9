"""Shared test set-up.

- Without a GPU, Triton kernels run under the interpreter (TRITON_INTERPRET=1), set here
  before anything imports triton.
- ``poison_empty`` (autouse): torch.empty / empty_like / new_empty return NaN-filled float
  tensors, so an output a kernel or solver never wrote fails loudly instead of passing on
  whatever memory held.
- ``shared_data``: the path of ../shared/data, or a clean skip when it is absent.
"""
from __future__ import annotations

import os
import pathlib

if not os.environ.get("FASTEDIT_TEST_GPU"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _cuda_ok() -> bool:
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if _cuda_ok():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def _nan_fill(t):
    if isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex()):
        t.fill_(float("nan"))
    return t


@pytest.fixture(autouse=True)
def poison_empty(monkeypatch):
    real_empty, real_like, real_new = torch.empty, torch.empty_like, torch.Tensor.new_empty

    def empty(*args, **kwargs):
        return _nan_fill(real_empty(*args, **kwargs))

    def empty_like(*args, **kwargs):
        return _nan_fill(real_like(*args, **kwargs))

    def new_empty(self, *args, **kwargs):
        return _nan_fill(real_new(self, *args, **kwargs))

    monkeypatch.setattr(torch, "empty", empty)
    monkeypatch.setattr(torch, "empty_like", empty_like)
    monkeypatch.setattr(torch.Tensor, "new_empty", new_empty)
    yield


@pytest.fixture
def shared_data() -> pathlib.Path:
    path = ROOT.parent / "shared" / "data"
    if not path.is_dir():
        pytest.skip("../shared/data is absent")
    return path


@pytest.fixture
def gen():
    """A fresh, differently seeded generator per test (fresh random inputs, reproducible per run)."""
    seed = int.from_bytes(os.urandom(4), "little")
    return torch.Generator().manual_seed(seed)  # g.initial_seed() tells a failing test's seed
