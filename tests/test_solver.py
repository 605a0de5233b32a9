"""memit_solve and UpdateSolver against float64 torch.linalg.solve references."""
from __future__ import annotations


import pytest
import torch

from fastedit.errors import InputError, NotPositiveDefiniteError
from fastedit.linalg import UpdateSolver, memit_solve
from fastedit.testing import assert_close, random_spd, rel_error

F64 = torch.float64


def _problem(d_k, n, batch, gen, d=11):
    C = random_spd(d_k, batch=batch, cond=1e3, generator=gen)
    K = torch.randn(*batch, d_k, n, dtype=F64, generator=gen)
    R = torch.randn(*batch, d, n, dtype=F64, generator=gen)
    return C, K, R


def _reference_update(A, K, R):
    """ΔW = R Kᵀ (A + K Kᵀ)⁻¹ the way the references compute it: fp64 LU, then R adjᵀ."""
    return R @ torch.linalg.solve(A + K @ K.mT, K).mT


@pytest.mark.parametrize("d_k", [1, 7, 33, 97])
@pytest.mark.parametrize("n", [1, 5, 13])
@pytest.mark.parametrize("batch", [(), (3,)])
def test_memit_solve_matches_lu(d_k, n, batch, gen):
    C, K, _ = _problem(d_k, n, batch, gen)
    lam = 1.0 + 10 * torch.rand(batch, dtype=F64, generator=gen) if batch else 15000.0
    lam_b = lam[..., None, None] if batch else lam
    assert_close(memit_solve(C, K, lam), torch.linalg.solve(lam_b * C + K @ K.mT, K), 1e-9)


def test_memit_solve_broadcasts_one_covariance_over_batched_keys(gen):
    C, _, _ = _problem(33, 5, (), gen)
    K = torch.randn(2, 3, 33, 5, dtype=F64, generator=gen)
    assert_close(memit_solve(C, K, 2.0), torch.linalg.solve(2.0 * C + K @ K.mT, K), 1e-9)


@pytest.mark.parametrize("d_k", [33, 97])
def test_memit_solve_float32_no_worse_than_torch(d_k, gen):
    C, K, _ = _problem(d_k, 13, (4,), gen)
    ref = torch.linalg.solve(3.0 * C + K @ K.mT, K)
    C32, K32 = C.float(), K.float()
    torch_err = rel_error(torch.linalg.solve(3.0 * C32 + K32 @ K32.mT, K32), ref)
    out = memit_solve(C32, K32, 3.0)
    assert out.dtype == torch.float32
    assert_close(out, ref, 2 * torch_err)


def test_memit_solve_half_inputs_are_solved_in_float32(gen):
    C, K, _ = _problem(33, 5, (), gen)
    Cb, Kb = C.bfloat16(), K.bfloat16()
    out = memit_solve(Cb, Kb, 3.0)
    assert out.dtype == torch.bfloat16
    ref = torch.linalg.solve(3.0 * Cb.double() + Kb.double() @ Kb.double().mT, Kb.double())
    assert_close(out, ref, 2 * 2.0**-8)


@pytest.mark.parametrize("d_k", [1, 7, 33, 97])
@pytest.mark.parametrize("n", [1, 5, 13])
@pytest.mark.parametrize("method", ["auto", "woodbury", "direct"])
def test_update_solver_matches_lu(d_k, n, method, gen):
    C, K, R = _problem(d_k, n, (), gen)
    lam, mu = 15000.0, 0.5
    solver = UpdateSolver(C, lam, mu=mu)
    A = lam * C + mu * torch.eye(d_k, dtype=F64)
    assert_close(solver.solve(K, R, method=method), _reference_update(A, K, R), 1e-9)


def test_update_solver_several_layers_at_once(gen):
    C, K, R = _problem(33, 5, (3,), gen)
    lam = torch.tensor([1.0, 100.0, 15000.0], dtype=F64)
    solver = UpdateSolver(C, lam)
    assert solver.pivot_ratio().shape == (3,)
    for method in ("woodbury", "direct"):
        assert_close(solver.solve(K, R, method=method), _reference_update(lam[:, None, None] * C, K, R), 1e-9)


@pytest.mark.parametrize("d_k", [33, 97])
@pytest.mark.parametrize("method", ["woodbury", "direct"])
def test_update_solver_float32_no_worse_than_torch(d_k, method, gen):
    C, K, R = _problem(d_k, 13, (4,), gen)
    ref = _reference_update(3.0 * C, K, R)
    torch_err = rel_error(_reference_update(3.0 * C.float(), K.float(), R.float()), ref)
    out = UpdateSolver(C, 3.0, dtype=torch.float32).solve(K, R, method=method)
    assert out.dtype == torch.float32
    assert_close(out, ref, 2 * torch_err)


def test_auto_method_follows_flop_counts(gen):
    C, _, _ = _problem(33, 1, (), gen)
    state = UpdateSolver(C, 2.0)._state
    assert state.choose_method(5, 11) == "woodbury"
    assert state.choose_method(40, 11) == "direct"


def test_sequential_accumulate_and_remove_match_from_scratch(gen):
    d_k, n = 97, 13
    C, K, R = _problem(d_k, n, (), gen)
    lam, mu = 50.0, 0.1
    solver = UpdateSolver(C, lam, mu=mu)
    A = lam * C + mu * torch.eye(d_k, dtype=F64)
    added = []
    steps = ["+", "+", "s", "+", "-", "s", "+", "r", "+", "-", "s", "+", "+", "+", "-", "s", "+", "+", "s"]
    for step in steps:
        if step == "+":
            Kp = torch.randn(d_k, n, dtype=F64, generator=gen)
            solver.accumulate(Kp)
            added.append(Kp)
            A += Kp @ Kp.mT
        elif step == "-":
            Kp = added.pop(int(torch.randint(len(added), (1,), generator=gen)))
            solver.accumulate(Kp, sign=-1)
            A -= Kp @ Kp.mT
        elif step == "r":
            solver.refactor()
            assert solver.rank_since_refactor == 0
        for method in ("woodbury", "direct"):
            assert_close(solver.solve(K, R, method=method), _reference_update(A, K, R), 1e-9, f"{method} after {step}")
    assert solver.refactorizations >= 2, "97³/3 FLOPs are spent long before 12 rank-13 updates"


def test_removing_a_batch_gives_back_the_earlier_solution(gen):
    C, K, R = _problem(97, 5, (), gen)
    solver = UpdateSolver(C, 10.0)
    solver.accumulate(torch.randn(97, 5, dtype=F64, generator=gen))
    before = solver.solve(K, R)
    K1 = torch.randn(97, 5, dtype=F64, generator=gen)
    solver.accumulate(K1)
    assert rel_error(solver.solve(K, R), before) > 1e-3
    solver.accumulate(K1, sign=-1)
    assert solver.refactorizations == 0 and solver.rank_since_refactor == 5
    # the removed block cancels the added one: the same low-rank state, the same bits
    assert torch.equal(solver.solve(K, R), before)
    solver.accumulate(K1)
    solver.refactor()
    solver.accumulate(K1, sign=-1)
    assert_close(solver.solve(K, R), before, 1e-10)


def test_non_spd_names_index_layer_and_pivot(gen):
    C, _, _ = _problem(13, 3, (3,), gen)
    C[1, -1, :] = 0
    C[1, :, -1] = 0
    # λ = 0 is always singular; with λ > 0 only the layer whose covariance lost a direction is
    with pytest.raises(NotPositiveDefiniteError) as exc:
        UpdateSolver(C, 2.0, layer=17)
    assert exc.value.index == (1,) and exc.value.layer == 17 and exc.value.min_pivot == 0.0
    assert "layer 17" in str(exc.value) and "(1,)" in str(exc.value) and "column 13 of 13" in str(exc.value)
    with pytest.raises(NotPositiveDefiniteError, match=r"batch index \(0,\)"):
        UpdateSolver(C, 0.0)
    K = torch.randn(13, 3, dtype=F64, generator=gen)
    K[3:] = 0
    with pytest.raises(NotPositiveDefiniteError, match="column 4 of 13") as exc:
        memit_solve(C[0], K, 0.0, layer=4)
    assert exc.value.min_pivot == 0.0 and exc.value.index is None


def test_jitter_is_opt_in(gen):
    C, _, _ = _problem(13, 3, (), gen)
    C[-1, :] = 0
    C[:, -1] = 0
    with pytest.warns(RuntimeWarning, match="jitter"):
        solver = UpdateSolver(C, 2.0, jitter=1e-10)
    assert solver.pivot_ratio().item() < 1e-9


@pytest.mark.parametrize("where", ["C", "K"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_inputs_are_named(where, bad, gen):
    C, K, R = _problem(7, 3, (), gen)
    {"C": C, "K": K}[where][2, 1] = bad
    with pytest.raises(InputError, match=f"^{where} contains NaN or Inf"):
        memit_solve(C, K, 1.0)
    if where == "C":
        with pytest.raises(InputError, match="^C0 contains NaN or Inf"):
            UpdateSolver(C, 1.0)
    else:
        solver = UpdateSolver(C.nan_to_num(), 1.0)
        with pytest.raises(InputError, match="^K contains NaN or Inf"):
            solver.solve(K, R)
        with pytest.raises(InputError, match="^K contains NaN or Inf"):
            solver.accumulate(K)
        R[0, 0] = bad
        with pytest.raises(InputError, match="^R contains NaN or Inf"):
            solver.solve(K.nan_to_num(posinf=0.0), R)


def test_memit_solve_mismatches_name_the_argument(gen):
    C, K, _ = _problem(7, 3, (), gen)
    with pytest.raises(InputError, match="^K must have 7 rows"):
        memit_solve(C, K[:5], 1.0)
    with pytest.raises(InputError, match="^C must be square"):
        memit_solve(C[:, :5], K, 1.0)
    with pytest.raises(InputError, match="^K has dtype torch.float32 but C has torch.float64"):
        memit_solve(C, K.float(), 1.0)
    with pytest.raises(InputError, match="^K is on meta but C is on cpu"):
        memit_solve(C, K.to("meta"), 1.0)
    with pytest.raises(InputError, match="^the batch dimensions of C"):
        memit_solve(C.expand(2, 7, 7), K.expand(3, 7, 3), 1.0)
    with pytest.raises(InputError, match="^lam of shape"):
        memit_solve(C.expand(2, 7, 7), K, torch.ones(3, dtype=F64))
    with pytest.raises(InputError, match="^lam must be finite and >= 0"):
        memit_solve(C, K, -1.0)
    with pytest.raises(InputError, match="^K must be a floating-point tensor"):
        memit_solve(C, K.long(), 1.0)


def test_update_solver_mismatches_name_the_argument(gen):
    C, K, R = _problem(7, 3, (), gen)
    solver = UpdateSolver(C, 1.0)
    with pytest.raises(InputError, match="^K must have 7 rows"):
        solver.solve(K[:6], R)
    with pytest.raises(InputError, match="^R must have one column per key"):
        solver.solve(K, R[:, :2])
    with pytest.raises(InputError, match="^K has leading"):
        solver.solve(K.expand(2, 7, 3), R)
    with pytest.raises(InputError, match="^R is on meta"):
        solver.solve(K, R.to("meta"))
    with pytest.raises(InputError, match="^K is on meta"):
        solver.accumulate(K.to("meta"))
    with pytest.raises(InputError, match="^sign must be 1 or -1"):
        solver.accumulate(K, sign=2)
    with pytest.raises(InputError, match="^method must be"):
        solver.solve(K, R, method="lu")
    with pytest.raises(InputError, match="^mu must be finite"):
        UpdateSolver(C, 1.0, mu=float("nan"))
    with pytest.raises(InputError, match="^dtype must be"):
        UpdateSolver(C, 1.0, dtype=torch.float16)
