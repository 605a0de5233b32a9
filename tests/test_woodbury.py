"""woodbury_solve (the extension's reference) and LowRankCholesky (cached factor + signed keys)."""
from __future__ import annotations


import pytest
import torch

from fastedit import _ext
from fastedit.errors import InputError, NotPositiveDefiniteError
from fastedit.linalg import cholesky_factor, woodbury_solve
from fastedit.linalg.woodbury import LowRankCholesky, woodbury_solve_torch
from fastedit.testing import assert_close, random_spd

F64 = torch.float64


def _signed_system(n, m, batch, gen):
    """L, U, s, and the dense L Lᵀ + U diag(s) Uᵀ, kept well conditioned: the columns removed
    (s = -1) are small against the smallest eigenvalue of L Lᵀ."""
    A0 = random_spd(n, batch=batch, cond=1e2, generator=gen)
    s = torch.where(torch.rand(*batch, m, generator=gen) < 0.5, -1.0, 1.0).to(F64)
    U = torch.randn(*batch, n, m, dtype=F64, generator=gen)
    U = U * torch.where(s < 0, 0.5 / max(1, m) ** 0.5 / n**0.5, 1.0).unsqueeze(-2)
    return cholesky_factor(A0), U, s, A0 + (U * s.unsqueeze(-2)) @ U.mT


@pytest.mark.parametrize("n", [1, 7, 33, 97])
@pytest.mark.parametrize("m", [0, 1, 6])
@pytest.mark.parametrize("batch", [(), (2,)])
def test_woodbury_solve_matches_dense_solve(n, m, batch, gen):
    L, U, s, A = _signed_system(n, m, batch, gen)
    B = torch.randn(*batch, n, 5, dtype=F64, generator=gen)
    assert_close(woodbury_solve(L, U, s, B), torch.linalg.solve(A, B), 1e-9)


def test_woodbury_solve_float32_no_worse_than_torch(gen):
    L, U, s, A = _signed_system(97, 6, (4,), gen)
    B = torch.randn(4, 97, 5, dtype=F64, generator=gen)
    ref = torch.linalg.solve(A, B)
    torch_err = (torch.linalg.solve(A.float(), B.float()).double() - ref).norm() / ref.norm()
    assert_close(woodbury_solve(L.float(), U.float(), s.float(), B.float()), ref, 2 * torch_err.item())


def test_woodbury_solve_checks_shapes():
    L = torch.eye(4, dtype=F64)
    with pytest.raises(InputError, match=r"U must have shape \(\.\.\., n, m\) with L's batch dims and n = 4"):
        woodbury_solve(L, torch.ones(3, 2, dtype=F64), torch.ones(2, dtype=F64), torch.ones(4, 1, dtype=F64))
    with pytest.raises(InputError, match="s must have shape .* m = 2"):
        woodbury_solve(L, torch.ones(4, 2, dtype=F64), torch.ones(3, dtype=F64), torch.ones(4, 1, dtype=F64))
    with pytest.raises(InputError, match="B must have shape"):
        woodbury_solve(L, torch.ones(4, 2, dtype=F64), torch.ones(2, dtype=F64), torch.ones(3, 1, dtype=F64))


def test_woodbury_solve_routes_to_the_extension(monkeypatch, gen):
    calls = []

    def fake(L, U, s, B):
        calls.append(U.shape)
        return woodbury_solve_torch(L, U, s, B)

    monkeypatch.setattr(_ext, "available_for", lambda device: True)
    monkeypatch.setattr(_ext, "woodbury_solve", fake, raising=False)
    L, U, s, A = _signed_system(7, 3, (), gen)
    B = torch.randn(7, 2, dtype=F64, generator=gen)
    assert_close(woodbury_solve(L, U, s, B, backend="ext"), torch.linalg.solve(A, B), 1e-9)
    assert calls == [U.shape]


def test_low_rank_state_tracks_signed_updates_and_refactors(gen):
    n = 33
    A = random_spd(n, cond=1e2, generator=gen)
    state = LowRankCholesky(A.clone())
    B = torch.randn(n, 4, dtype=F64, generator=gen)
    dense = A.clone()
    blocks = [torch.randn(n, 3, dtype=F64, generator=gen) for _ in range(4)]
    for V in blocks:
        state.add(V, 1)
        dense += V @ V.mT
        assert_close(state.apply_inverse(B), torch.linalg.solve(dense, B), 1e-10)
    V = blocks[1] * 0.1
    state.add(V, -1)
    dense -= V @ V.mT
    assert_close(state.apply_inverse(B), torch.linalg.solve(dense, B), 1e-10)
    assert_close(state.A, dense, 1e-14, "running A")
    # 33³/3 FLOPs of refactoring are reached well within 13 rank-3 updates of a 33 × 33 system
    for _ in range(13):
        V = torch.randn(n, 3, dtype=F64, generator=gen)
        state.add(V, 1)
        dense += V @ V.mT
    assert state.refactorizations >= 1
    assert_close(state.apply_inverse(B), torch.linalg.solve(dense, B), 1e-10)


def test_removing_keys_never_added_is_refused_and_leaves_the_state(gen):
    n = 13
    state = LowRankCholesky(torch.eye(n, dtype=F64))
    kept = torch.randn(n, 2, dtype=F64, generator=gen)
    state.add(kept, 1)
    A_before, rank_before = state.A.clone(), state.rank_since_refactor
    with pytest.raises(NotPositiveDefiniteError, match="indefinite"):
        state.add(3 * torch.randn(n, 2, dtype=F64, generator=gen), -1)
    assert torch.equal(state.A, A_before) and state.rank_since_refactor == rank_before


def test_cancellation_compares_against_its_own_copy_of_the_keys(gen):
    n = 97
    A = random_spd(n, cond=1e2, generator=gen)
    state = LowRankCholesky(A.clone())
    V = torch.randn(n, 3, dtype=F64, generator=gen)
    state.add(V, 1)
    dense = A + V @ V.mT
    V.mul_(0.5)  # the caller reuses its buffer: this is not the block that was added
    state.add(V, -1)
    dense -= V @ V.mT
    assert state.rank_since_refactor == 6
    B = torch.randn(n, 2, dtype=F64, generator=gen)
    assert_close(state.apply_inverse(B), torch.linalg.solve(dense, B), 1e-10)


def test_a_block_wider_than_the_system_refactors_without_a_capacitance(gen, monkeypatch):
    # Many keys at once (a batch of thousands of edits against a few hundred dimensions) reach
    # the refactorisation in one add; the (m + k)² capacitance it would discard is never built,
    # and the state is bit for bit the one the capacitance route ends in.
    n, k = 17, 40
    A = random_spd(n, cond=1e2, generator=gen)
    V = torch.randn(n, k, dtype=F64, generator=gen)
    state = LowRankCholesky(A.clone())
    state.add(torch.randn(n, 2, dtype=F64, generator=gen), 1)
    expected = state.A.clone()
    expected.view(-1, n, n).baddbmm_(V.reshape(-1, n, k), V.reshape(-1, n, k).mT)

    def no_capacitance(*args, **kwargs):
        raise AssertionError("the capacitance route ran")

    monkeypatch.setattr("fastedit.linalg.woodbury.cholesky_apply_inverse", no_capacitance)
    state.add(V, 1)
    monkeypatch.undo()
    assert state.refactorizations == 1 and state.rank_since_refactor == 0
    assert torch.equal(state.A, expected)
    assert torch.equal(state.L, cholesky_factor(expected))
    B = torch.randn(n, 3, dtype=F64, generator=gen)
    assert_close(state.apply_inverse(B), torch.linalg.solve(expected, B), 1e-10)
