"""Faithful baselines of the reference research code, timed beside fastedit in the benchmarks.

Each function computes what the references compute, the way they compute it (dtype, algorithm),
written as our own code.
"""
from __future__ import annotations

import torch

from fastedit.linalg import alphaedit_dense_reference

# --- Closed-form solvers: MEMIT and AlphaEdit updates (solver branch) -----------------------


def memit_lu_update(C, K, R, lam):
    """MEMIT's update as the references compute it: adj = solve(λC + K Kᵀ, K) by a general LU
    in float64, ΔW = R adjᵀ. C (d_k, d_k), K (d_k, n), R (d, n) -> (d, d_k)."""
    adj = torch.linalg.solve(lam * C + K @ K.mT, K)
    return R @ adj.mT


def alphaedit_dense_update(P, K, R, alpha, cache_c):
    """AlphaEdit's update as the reference computes it: the dense projector P (d_k, d_k), the
    non-symmetric system solve(P (K Kᵀ + C_p) + αI, P K Rᵀ) by LU, in the inputs' dtype (float32
    in the reference). Returns ΔW (d, d_k)."""
    return alphaedit_dense_reference(P, K, R, alpha, cache_c)
