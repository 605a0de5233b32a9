"""Faithful baselines: the reference research code's algorithms, written as those references
run them (our own code), for side-by-side benchmarks against fastedit."""
from __future__ import annotations

import torch

# --- Covariance statistics and norm anchoring (kernels branch) -----------------------------


def covariance_fp32_running_sum(batches, d_k: int, masks=None):
    """The references' second-moment statistic: per batch, the real tokens' keys in fp32 and
    ``mom2 += kᵀk`` into an fp32 running sum (full matrix, both triangles), plus the count.

    batches: iterable of (tokens, d_k) tensors; masks: matching (tokens,) bool or None.
    Returns (sum (d_k, d_k) float32, count).
    """
    total, count = None, 0
    for i, x in enumerate(batches):
        rows = x.float()
        if masks is not None:
            rows = rows[masks[i]]
        if total is None:
            total = torch.zeros(d_k, d_k, dtype=torch.float32, device=x.device)
        total += rows.mT @ rows
        count += rows.shape[0]
    return total, count


def norm_anchor_per_fact(v: torch.Tensor, mu: float, max_ratio: float = 2.0):
    """NAS as the reference applies it: one value vector at a time, a Python decision per fact.
    Returns (scaled v, keep)."""
    out = v.clone()
    keep = []
    for i in range(v.shape[0]):
        norm = v[i].norm()
        if norm > max_ratio * mu:
            keep.append(False)
            continue
        keep.append(True)
        out[i] = v[i] * (mu / norm)
    return out, torch.tensor(keep)


def clamp_norm_per_fact(delta: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """compute_z's clamp, one edit at a time: δ ← δ · r/‖δ‖ when ‖δ‖ > r."""
    out = delta.clone()
    for i in range(delta.shape[0]):
        norm = delta[i].norm()
        if norm > radius[i]:
            out[i] = delta[i] * (radius[i] / norm)
    return out
