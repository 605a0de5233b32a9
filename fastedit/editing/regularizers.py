"""Weight-side regularisers of an edit (ALGORITHMS.md section 8): RECT and PRUNE.

Both work on W of shape (d, d_k) as :class:`fastedit.models.ModelAdapter.weight` gives it.

RECT over several layers: the reference computes every layer's update with the unmasked
updates of the layers before it in place and masks them all at the end. fastedit masks each
layer's ΔW before applying it (:meth:`fastedit.editing.methods.BatchRun.solve_and_apply`), so
every later measurement (keys, MEMIT's z − cur, BLUE's second v*) sees the model as it will
be, and later layers make up for what the mask took from earlier ones. Masking at the end
writes a combination of updates that was never measured together.
"""
from __future__ import annotations

import torch

from fastedit.errors import InputError


def rect_mask(delta: torch.Tensor, weight: torch.Tensor, keep: float = 0.4) -> torch.Tensor:
    """RECT's mask: True on the ``floor(keep · numel)`` entries with the largest relative change

        r_ij = |ΔW_ij| / (|W_ij| + 1e-8)

    (ties broken by :func:`torch.topk`, so exactly that many entries are kept). Shapes (d, d_k).
    """
    if delta.shape != weight.shape:
        raise InputError(f"RECT: ΔW {tuple(delta.shape)} and W {tuple(weight.shape)} must have the same shape")
    if not 0 < keep <= 1:
        raise InputError(f"RECT: keep must be in (0, 1], got {keep!r}")
    rel = delta.abs().to(torch.float64) / (weight.abs().to(torch.float64) + 1e-8)
    k = int(keep * rel.numel())
    mask = torch.zeros(rel.numel(), dtype=torch.bool, device=rel.device)
    if k > 0:
        mask[torch.topk(rel.flatten(), k, sorted=False).indices] = True
    return mask.view_as(rel)


def rect(delta: torch.Tensor, weight: torch.Tensor, keep: float = 0.4) -> torch.Tensor:
    """ΔW with every entry outside :func:`rect_mask` set to zero (the part RECT adds)."""
    return torch.where(rect_mask(delta, weight, keep), delta, torch.zeros((), dtype=delta.dtype, device=delta.device))


def prune_restrain(delta_total: torch.Tensor, weight0: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """PRUNE's restrained total update F(ΔW_total), computed in float64.

    With ΔW_total = U diag(σ) Vᵀ and s = σ_max(W_0), every σ_i ≥ s becomes
    ln σ_i − ln s + s (the others are kept). The caller writes ``W_0 + F(ΔW_total)``: the
    restrained update replaces the raw one, it is not added on top of the edited W.

    Returns (F(ΔW_total) (d, d_k) in float64, info) where info has ``sigma_max_w0``, the
    number of singular values changed and the largest one before/after.
    """
    if delta_total.shape != weight0.shape:
        raise InputError(f"PRUNE: ΔW {tuple(delta_total.shape)} and W0 {tuple(weight0.shape)} must have the same shape")
    dw = delta_total.to(torch.float64)
    s = torch.linalg.matrix_norm(weight0.to(torch.float64), ord=2)
    u, sig, vh = torch.linalg.svd(dw, full_matrices=False)
    big = sig >= s
    new_sig = torch.where(big, torch.log(sig) - torch.log(s) + s, sig)
    restrained = (u * new_sig) @ vh
    info = {"sigma_max_w0": float(s), "restrained": int(big.sum()),
            "sigma_max_before": float(sig.max()) if sig.numel() else 0.0,
            "sigma_max_after": float(new_sig.max()) if sig.numel() else 0.0}
    return restrained, info
