"""NAS norm anchoring of value vectors and the per-edit norm clamp of δ (ALGORITHMS.md 5, 7).

Each op has a plain-torch reference (here) and a Triton kernel
(:mod:`fastedit.kernels.norm_anchor`, one program per row); ``backend=None`` takes the kernel
for CUDA tensors of bf16/fp16/fp32 that do not need gradients, the reference otherwise
(:mod:`fastedit.linalg.backends`).
Norms are accumulated in float32 for bf16/fp16/fp32 inputs and in float64 for float64 inputs.
"""
from __future__ import annotations

import math

import torch

from fastedit.errors import InputError
from fastedit.linalg import backends


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _positive_finite(value, name: str) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise InputError(f"{name} must be a positive number, got {value!r}") from exc
    if not (math.isfinite(value) and value > 0):
        raise InputError(f"{name} must be a positive finite number, got {value}")
    return value


def _rows(x: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise InputError(f"{name} must be a floating-point tensor, got "
                         f"{getattr(x, 'dtype', type(x).__name__)}")
    if x.ndim < 1 or x.shape[-1] == 0:
        raise InputError(f"{name} has shape {tuple(x.shape)}; it must be (..., d) with d >= 1")
    return x.reshape(-1, x.shape[-1])


def norm_anchor_reference(v: torch.Tensor, mu: float, threshold: float):
    """Plain-torch (out, keep, norms) for v (n, d): keep_i = ‖v_i‖ ≤ threshold,
    out_i = v_i · μ/‖v_i‖ where kept, v_i otherwise; computed in fp32 (float64 for float64)."""
    acc = v.to(_accumulation_dtype(v.dtype))
    norms = torch.linalg.vector_norm(acc, dim=-1)
    keep = norms <= threshold
    scale = torch.where(keep, mu / norms, torch.ones_like(norms))
    return (acc * scale[:, None]).to(v.dtype), keep, norms


def norm_anchor(v: torch.Tensor, mu, max_ratio: float = 2.0, *, backend: str | None = None,
                return_norms: bool = False):
    """NAS: rescale each value vector to the anchor norm μ, or drop it when it is too long.

        keep_i     = ‖v_i‖ ≤ max_ratio · μ
        v_scaled_i = v_i · μ / ‖v_i‖   where keep_i,   v_i otherwise

    Args:
        v: (..., d) value vectors v* (any float dtype).
        mu: the anchor norm μ > 0 (see :func:`anchor_from_norms`).
        max_ratio: drop threshold as a multiple of μ (2 in NAS).
        backend: None, ``"torch"`` or ``"triton"``.
        return_norms: also return ‖v_i‖ (float32, float64 for float64 v).

    Returns:
        (v_scaled, keep): v_scaled like v; keep (...) bool. With return_norms,
        (v_scaled, keep, norms).

    Raises InputError for a zero or non-finite ‖v_i‖ (a zero vector has no direction to keep,
    and a NaN norm would silently count as dropped).
    """
    rows = _rows(v, "v")
    mu = _positive_finite(mu, "mu")
    threshold = mu * _positive_finite(max_ratio, "max_ratio")
    if backends.pick("norm_anchor", backend, v) == "triton":
        from fastedit.kernels import norm_anchor as kernel

        out, keep, norms = kernel.norm_anchor_rows(
            rows if rows.stride(-1) == 1 else rows.contiguous(), mu, threshold)
    else:
        out, keep, norms = norm_anchor_reference(rows, mu, threshold)
    bad = ~torch.isfinite(norms) | (norms == 0)
    if bool(bad.any()):
        index = int(bad.nonzero()[0, 0])
        raise InputError(f"norm_anchor: row {index} of v (flattened over the leading dims) has "
                         f"norm {float(norms[index])}; every value vector needs a finite, "
                         f"non-zero norm")
    lead = v.shape[:-1]
    result = (out.reshape(v.shape), keep.reshape(lead))
    return result + (norms.reshape(lead),) if return_norms else result


def clamp_norm_reference(delta: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """Plain-torch δ_i · min(1, r_i / max(‖δ_i‖, tiny)) for δ (n, d), r (n,), in fp32 (float64
    for float64); differentiable, with finite gradients at δ_i = 0."""
    acc = delta.to(_accumulation_dtype(delta.dtype))
    norms = torch.linalg.vector_norm(acc, dim=-1)
    # max(‖δ‖, tiny) keeps a zero row at scale 1 with a finite gradient (δ starts at zero in
    # the v* optimisation); the kernel uses the same formula.
    safe = norms.clamp_min(torch.finfo(norms.dtype).tiny)
    scale = torch.clamp(radius.to(norms.dtype) / safe, max=1.0)
    return (acc * scale[:, None]).to(delta.dtype)


def clamp_norm(delta: torch.Tensor, radius, *, backend: str | None = None) -> torch.Tensor:
    """Project each δ_i onto the ball of radius r_i:  δ_i · min(1, r_i / ‖δ_i‖).

    Args:
        delta: (..., d) offsets (any float dtype).
        radius: a number, or a tensor broadcastable to delta.shape[:-1]; every r_i ≥ 0.
        backend: None, ``"torch"`` or ``"triton"`` (the kernel records no gradients; with
            backend=None a delta that requires grad takes the differentiable torch path).

    Returns:
        A new tensor like delta. ‖δ_i‖ = 0 gives δ_i unchanged.
    """
    rows = _rows(delta, "delta")
    lead = delta.shape[:-1]
    if isinstance(radius, torch.Tensor):
        try:
            radius = torch.broadcast_to(radius.detach(), lead)
        except RuntimeError as exc:
            raise InputError(f"radius has shape {tuple(radius.shape)}, which does not "
                             f"broadcast to delta's leading shape {tuple(lead)}") from exc
        radius = radius.to(device=delta.device)
    else:
        try:
            radius = torch.full(lead, float(radius), device=delta.device)
        except (TypeError, ValueError) as exc:
            raise InputError(f"radius must be a number or a tensor, got {radius!r}") from exc
    radius = radius.reshape(-1)
    if not bool((radius >= 0).all() & torch.isfinite(radius).all()):
        raise InputError("clamp_norm: every radius must be finite and >= 0")
    if backends.pick("clamp_norm", backend, delta) == "triton":
        from fastedit.kernels import norm_anchor as kernel

        out = kernel.clamp_rows(rows if rows.stride(-1) == 1 else rows.contiguous(),
                                radius.to(torch.float32).contiguous())
    else:
        out = clamp_norm_reference(rows, radius)
    return out.reshape(delta.shape)


def anchor_from_norms(norms, trim_quantile: float = 0.95) -> float:
    """The NAS anchor μ: the mean of the norms after dropping the k = ⌊(1 − trim_quantile)·m⌋
    largest, i.e. by default the reference's mean ‖v*‖ without its ⌊0.05·m⌋ largest norms.

    (A quantile cut, "mean of the norms ≤ the 95th percentile", drops one more whenever
    0.05·(m − 1) is not an integer; this matches the reference instead.)

    Args:
        norms: (m,) ‖v*‖ over a sample of edit requests on the unedited model (m ≥ 1).
        trim_quantile: the share of the sample kept, in (0, 1]; at least one norm is kept.
    """
    norms = torch.as_tensor(norms).detach().to(torch.float64).cpu()
    if norms.ndim != 1 or norms.numel() == 0:
        raise InputError(f"norms must be a non-empty 1-D tensor, got shape {tuple(norms.shape)}")
    if not bool(torch.isfinite(norms).all() & (norms >= 0).all()):
        raise InputError("norms must be finite and >= 0")
    if not 0 < trim_quantile <= 1:
        raise InputError(f"trim_quantile must be in (0, 1], got {trim_quantile}")
    m = norms.numel()
    # rounded first so that e.g. (1 − 0.9)·10 = 0.9999999999999998 counts as 1
    k = min(math.floor(round((1 - trim_quantile) * m, 9)), m - 1)
    return float(norms.sort().values[:m - k].mean())
