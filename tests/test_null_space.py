"""NullSpace: the reduced AlphaEdit solve against the reference's dense formulation."""
from __future__ import annotations


import pytest
import torch

from fastedit.errors import InputError
from fastedit.linalg import NullSpace, alphaedit_dense_reference
from fastedit.testing import assert_close, random_covariance_with_null_space, rel_error

F64 = torch.float64


def _problem(d_k, n, gen, d=11):
    C0 = random_covariance_with_null_space(d_k, null_fraction=0.7, generator=gen)
    K = torch.randn(d_k, n, dtype=F64, generator=gen)
    R = torch.randn(d, n, dtype=F64, generator=gen)
    return C0, K, R


@pytest.mark.parametrize("d_k", [7, 33, 97])
def test_basis_is_the_small_eigenvectors(d_k, gen):
    C0, _, _ = _problem(d_k, 1, gen)
    ns = NullSpace.from_covariance(C0, threshold=2e-2)
    assert ns.rank == round(0.7 * d_k) == int((torch.linalg.eigvalsh(C0) < 2e-2).sum())
    assert_close(ns.eigenvalues, torch.linalg.eigvalsh(C0), 1e-12, "eigenvalues")
    assert_close(ns.Q.mT @ ns.Q, torch.eye(ns.rank, dtype=F64), 1e-12, "QᵀQ")
    assert float((C0 @ ns.Q).norm()) < 2e-2 * ns.rank**0.5
    P = ns.projector()
    assert_close(P @ P, P, 1e-12, "P²")


@pytest.mark.parametrize("d_k", [1, 7, 33, 97])
@pytest.mark.parametrize("n", [1, 5, 13])
@pytest.mark.parametrize("method", ["auto", "woodbury", "direct"])
def test_reduced_solve_matches_dense_reference(d_k, n, method, gen):
    C0, K, R = _problem(d_k, n, gen)
    ns = NullSpace.from_covariance(C0)
    dense = alphaedit_dense_reference(ns.projector(), K, R, 10.0, torch.zeros(d_k, d_k, dtype=F64))
    out = ns.solve(K, R, 10.0, method=method)
    assert out.shape == (11, d_k)
    assert_close(out, dense, 1e-9)


def test_sequence_with_accumulated_keys_and_changing_alpha(gen):
    d_k, n = 97, 13
    C0, K, R = _problem(d_k, n, gen)
    ns = NullSpace.from_covariance(C0)
    P = ns.projector()
    cache_c = torch.zeros(d_k, d_k, dtype=F64)
    for step, alpha in enumerate([10.0, 10.0, 10.0, 1.0, 1.0, 95.0, 95.0, 95.0, 95.0]):
        for method in ("woodbury", "direct"):
            dense = alphaedit_dense_reference(P, K, R, alpha, cache_c)
            assert_close(ns.solve(K, R, alpha, method=method), dense, 1e-9, f"{method} at step {step}")
        Kp = torch.randn(d_k, n, dtype=F64, generator=gen)
        ns.accumulate(Kp)
        cache_c += Kp @ Kp.mT
    assert ns.refactorizations >= 1, "68³/3 FLOPs are spent within three rank-13 updates"
    ns.accumulate(Kp, sign=-1)
    cache_c -= Kp @ Kp.mT
    assert_close(ns.solve(K, R, 95.0), alphaedit_dense_reference(P, K, R, 95.0, cache_c), 1e-9, "after removal")


def test_explicit_accumulated_covariance(gen):
    d_k = 33
    C0, K, R = _problem(d_k, 5, gen)
    ns = NullSpace.from_covariance(C0)
    Kp = torch.randn(d_k, 20, dtype=F64, generator=gen)
    cache_c = Kp @ Kp.mT
    dense = alphaedit_dense_reference(ns.projector(), K, R, 10.0, cache_c)
    assert_close(ns.solve(K, R, 10.0, accumulated=cache_c), dense, 1e-9)
    assert ns.rank_since_refactor == 0, "an explicit C_p must leave the internal state alone"


def test_float32_no_worse_than_the_dense_float32_reference(gen):
    d_k = 97
    C0, K, R = _problem(d_k, 13, gen)
    ns64 = NullSpace.from_covariance(C0)
    Kp = torch.randn(d_k, 26, dtype=F64, generator=gen)
    cache_c = Kp @ Kp.mT
    P = ns64.projector()
    ref = alphaedit_dense_reference(P, K, R, 10.0, cache_c)
    dense32 = alphaedit_dense_reference(P.float(), K.float(), R.float(), 10.0, cache_c.float())
    # the same basis as the dense baseline's P: this compares the solves, not two eigh runs
    ns32 = NullSpace(ns64.Q.float(), ns64.eigenvalues.float(), ns64.threshold)
    ns32.accumulate(Kp.float())
    out = ns32.solve(K.float(), R.float(), 10.0)
    assert out.dtype == torch.float32
    assert_close(out, ref, 2 * rel_error(dense32, ref))


def test_no_null_space_gives_no_update(gen):
    C0, K, R = _problem(7, 3, gen)
    ns = NullSpace.from_covariance(C0, threshold=0.0)
    assert ns.rank == 0
    assert torch.equal(ns.solve(K, R, 10.0), torch.zeros(11, 7, dtype=F64))


def test_errors_name_the_argument(gen):
    C0, K, R = _problem(7, 3, gen)
    ns = NullSpace.from_covariance(C0)
    with pytest.raises(InputError, match="^alpha must be a positive float"):
        ns.solve(K, R, 0.0)
    with pytest.raises(InputError, match="^K must have 7 rows"):
        ns.solve(K[:4], R, 1.0)
    with pytest.raises(InputError, match="^R must be"):
        ns.solve(K, R[:, :2], 1.0)
    with pytest.raises(InputError, match="^accumulated must have 7 rows"):
        ns.solve(K, R, 1.0, accumulated=torch.eye(5, dtype=F64))
    with pytest.raises(InputError, match="^K is on meta"):
        ns.accumulate(K.to("meta"))
    bad = K.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(InputError, match="^K contains NaN or Inf"):
        ns.accumulate(bad)
    C0[1, 1] = float("inf")
    with pytest.raises(InputError, match="^C0 contains NaN or Inf"):
        NullSpace.from_covariance(C0)
    with pytest.raises(InputError, match="^C0 must be one"):
        NullSpace.from_covariance(torch.eye(3, dtype=F64).expand(2, 3, 3))
