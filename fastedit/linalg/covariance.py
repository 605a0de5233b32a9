"""Key covariance statistics: the running sum Σ_t k_t k_tᵀ over real tokens and their count.

C0 = sum / count is the per-token mean MEMIT and AlphaEdit preserve (ALGORITHMS.md section 1).

Two backends, both with two-level accumulation (fp32 over a bounded chunk of tokens, float64
across chunks), so the error stays at the per-chunk bound however many tokens are added:

* ``"triton"`` (default on CUDA): the SYRK kernel of :mod:`fastedit.kernels.syrk`, lower
  triangle only on tensor cores; see its docstring for the error bound.
* ``"torch"`` (default elsewhere, and for float64 keys): :func:`accumulate_lower_torch`, each
  chunk of at most ``TORCH_CHUNK_TOKENS`` tokens upcast to fp32 (exact products for bf16/fp16
  keys, fp32 sums) and its lower column blocks added into the float64 sum; float64 keys are
  multiplied in float64. Chosen by measurement (one CPU thread, d_k = 1024, 8192 bf16 tokens
  of mean 3, relative error against float64): this path 0.53 s at 3.7e-8; the same with full
  products 0.58 s; torch.baddbmm over the chunks 0.63 s; float64 matmul 1.04 s at 0; the
  references' fp32 running sum 0.53 s at 6.6e-8, an error that grows with the token count
  (tests/test_covariance.py). Every chunked path meets an error bound independent of the token
  count, float64 by the widest margin but at twice the time, so the fp32 blocked path is the
  default for bf16/fp16/fp32 keys.

The sum is kept as a (d_k, d_k) float64 tensor of which the lower triangle (diagonal included)
is authoritative; ``.sum`` symmetrises it on read.
"""
from __future__ import annotations

import pathlib

import torch

from fastedit._io import load_tensors, save_tensors
from fastedit.errors import InputError
from fastedit.linalg import backends

#: Tokens per fp32 chunk on the torch path: bounds the fp32 copy of the chunk (d_k = 14336:
#: 117 MB) and the fp32 accumulation error (sgemm sums at most this many products).
TORCH_CHUNK_TOKENS = 2048

#: Target column-block width of the torch path's blocked lower-triangle product: blocks of at
#: least this many columns keep the CPU GEMMs efficient (measured 1.2-1.9x faster than the full
#: product at d_k = 512-2048).
TORCH_BLOCK = 512

_FORMAT = "fastedit-covariance-v1"
_RESERVED_KEYS = ("fastedit_format",)


def symmetrize_lower(s: torch.Tensor) -> torch.Tensor:
    """tril(s) + tril(s, -1)ᵀ: the symmetric matrix whose lower triangle is that of ``s``."""
    return torch.tril(s) + torch.tril(s, -1).mT


def accumulate_lower_torch(x: torch.Tensor, s: torch.Tensor,
                           chunk_tokens: int = TORCH_CHUNK_TOKENS,
                           block: int = TORCH_BLOCK) -> None:
    """s[lower triangle] += (xᵀ x)[lower triangle] in place, for x (N, d_k), s (d_k, d_k)
    float64: the plain-torch reference of the SYRK kernel.

    Two-level: each chunk of ``chunk_tokens`` rows is upcast to fp32 and multiplied in fp32,
    then added into s (float64 keys are multiplied in float64). The columns are split into
    nb = clamp(d_k // block, 1, 8) blocks and only the nb(nb+1)/2 block products on or below
    the diagonal are formed: (nb+1)/(2nb) of the FLOPs of the full product.
    """
    d_k = x.shape[1]
    n_blocks = max(1, min(8, d_k // block))
    edges = [round(i * d_k / n_blocks) for i in range(n_blocks + 1)]
    blocks = [slice(lo, hi) for lo, hi in zip(edges[:-1], edges[1:])]
    for start in range(0, x.shape[0], chunk_tokens):
        chunk = x[start:start + chunk_tokens]
        if chunk.dtype != torch.float64:
            chunk = chunk.to(torch.float32)
        for i, rows in enumerate(blocks):
            for cols in blocks[:i + 1]:
                # in-place add of the fp32 block product into the float64 sum: no fp64 temporary
                s[rows, cols] += chunk[:, rows].mT @ chunk[:, cols]


class CovarianceAccumulator:
    """Running sum of k kᵀ over real tokens, in float64, plus the token count.

    Args:
        d_k: key size.
        device: where the sum lives; None adopts the device of the first keys given to
            :meth:`update` (or of the accumulator merged or loaded into it).
        backend: ``"triton"`` (the SYRK kernel: CUDA, or CPU under TRITON_INTERPRET=1),
            ``"torch"``, or None for triton on CUDA with bf16/fp16/fp32 keys, torch otherwise
            (:mod:`fastedit.linalg.backends`).

    Attributes:
        sum: (d_k, d_k) float64, symmetric: Σ_t k_t k_tᵀ over real tokens (a new tensor).
        count: number of real tokens accumulated.
        metadata: dict of str → str, as loaded from a file (empty for a new accumulator).

    After an update with non-finite keys the accumulator holds partial sums and refuses
    further use (every method raises); start a new one or load the last saved file.
    """

    def __init__(self, d_k: int, *, device=None, backend: str | None = None):
        if not isinstance(d_k, int) or isinstance(d_k, bool) or d_k < 1:
            raise InputError(f"d_k must be a positive int, got {d_k!r}")
        self.d_k = d_k
        self.backend = backends.check(backend, "covariance", caller="CovarianceAccumulator")
        self.metadata: dict[str, str] = {}
        self._count = 0
        self._raw: torch.Tensor | None = None
        self._invalid: str | None = None
        if device is not None:
            self._allocate(torch.device(device))

    def _allocate(self, device: torch.device) -> None:
        self._raw = torch.zeros(self.d_k, self.d_k, dtype=torch.float64, device=device)

    @property
    def device(self) -> torch.device | None:
        return None if self._raw is None else self._raw.device

    def _check_valid(self) -> None:
        if self._invalid is not None:
            raise InputError(self._invalid)

    def update(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """sum += Σ_t mask_t · x_t x_tᵀ and count += Σ_t mask_t.

        Args:
            x: (..., d_k) keys, any float dtype (bf16/fp16/fp32 on the kernel, float64 on the
                torch path), on the accumulator's device.
            mask: (...) bool, True for real tokens (padding False), same leading shape as x.
                Masked tokens contribute nothing, whatever they hold (NaN included).
        """
        self._check_valid()
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise InputError(f"keys x must be a floating-point tensor, got "
                             f"{getattr(x, 'dtype', type(x).__name__)}")
        if x.ndim < 1 or x.shape[-1] != self.d_k:
            raise InputError(f"keys x has shape {tuple(x.shape)}; its last dimension must be "
                             f"d_k={self.d_k}")
        if self._raw is None:
            self._allocate(x.device)
        if x.device != self._raw.device:
            raise InputError(f"keys x are on {x.device} but the accumulator is on "
                             f"{self._raw.device}; move x or create the accumulator with "
                             f"device={str(x.device)!r}")
        rows = x.reshape(-1, self.d_k)
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
                raise InputError(f"mask must be a bool tensor (True = real token), got "
                                 f"{getattr(mask, 'dtype', type(mask).__name__)}")
            if mask.shape != x.shape[:-1]:
                raise InputError(f"mask has shape {tuple(mask.shape)} but x has leading shape "
                                 f"{tuple(x.shape[:-1])}; they must match")
            if mask.device != x.device:
                raise InputError(f"mask is on {mask.device} but x is on {x.device}")
            mask = mask.reshape(-1)
        if backends.pick("covariance", self.backend, x) == "triton":
            from fastedit.kernels import syrk

            if rows.stride(-1) != 1:
                rows = rows.contiguous()
            syrk.syrk_lower_accumulate(rows, self._raw, mask)
            added = rows.shape[0] if mask is None else int(mask.sum())
        else:
            if mask is not None:
                rows = rows[mask]
            accumulate_lower_torch(rows, self._raw)
            added = rows.shape[0]
        # A non-finite key in a real token makes its diagonal entry (a sum of squares) NaN or
        # Inf, so checking d_k values catches it without a pass over the keys.
        if not bool(torch.isfinite(self._raw.diagonal()).all()):
            self._invalid = (
                "an update had NaN/Inf keys (or overflowed) in real tokens; this accumulator "
                "now holds partial sums and cannot be used: check the model's activations, "
                "then start a new accumulator or load the last saved file")
            raise InputError(self._invalid)
        self._count += added

    def merge(self, other: "CovarianceAccumulator") -> None:
        """sum += other.sum, count += other.count (e.g. per-shard accumulators)."""
        self._check_valid()
        if not isinstance(other, CovarianceAccumulator):
            raise InputError(f"merge takes a CovarianceAccumulator, got {type(other).__name__}")
        other._check_valid()
        if other.d_k != self.d_k:
            raise InputError(f"cannot merge an accumulator of d_k={other.d_k} into one of "
                             f"d_k={self.d_k}")
        if other._raw is not None:
            if self._raw is None:
                self._allocate(other._raw.device)
            self._raw += other.sum.to(self._raw.device)
        self._count += other._count

    @property
    def sum(self) -> torch.Tensor:
        self._check_valid()
        if self._raw is None:
            return torch.zeros(self.d_k, self.d_k, dtype=torch.float64)
        return symmetrize_lower(self._raw)

    @property
    def count(self) -> int:
        self._check_valid()
        return self._count

    def mean(self) -> torch.Tensor:
        """C = sum / count: (d_k, d_k) float64, the per-token mean E[k kᵀ]."""
        if self.count == 0:
            raise InputError("mean() of a covariance accumulator with no tokens; call "
                             "update() with keys first")
        return self.sum / self._count

    def save(self, path, metadata: dict | None = None) -> None:
        """Write sum (float64), count and string metadata to a safetensors file, atomically:
        a temporary file in the same folder is renamed over ``path`` only once complete, so a
        reader never sees a partial file under the final name. Each tensor's SHA-256 is stored
        beside it (``sha256.sum``, ``sha256.count``) and checked by :meth:`load`.

        ``metadata`` values may be str, int, float or bool (stored as str); they are also
        kept as ``self.metadata`` (``sha256.*`` keys are replaced by the new checksums).
        """
        self._check_valid()
        meta = {} if metadata is None else dict(metadata)
        for key, value in meta.items():
            if not isinstance(key, str) or key in _RESERVED_KEYS:
                raise InputError(f"metadata key {key!r} must be a str other than "
                                 f"{_RESERVED_KEYS}")
            if not isinstance(value, (str, int, float, bool)):
                raise InputError(f"metadata[{key!r}] is a {type(value).__name__}; use str, "
                                 f"int, float or bool")
        meta = {key: str(value) for key, value in meta.items()}
        tensors = {
            "sum": self.sum.cpu().contiguous(),
            "count": torch.tensor([self._count], dtype=torch.int64),
        }
        save_tensors(path, tensors, {**meta, "fastedit_format": _FORMAT})
        self.metadata = meta

    @classmethod
    def load(cls, path, *, device=None, backend: str | None = None) -> "CovarianceAccumulator":
        """Read a file written by :meth:`save`; the result can keep accumulating (resume).
        A tensor that does not match its stored checksum is an InputError naming the file
        (files written before checksums existed load unchecked)."""
        path = pathlib.Path(path)
        if not path.is_file():
            raise InputError(f"covariance file {str(path)!r} does not exist")
        tensors, meta = load_tensors(path, require_checksums=False)
        if meta.pop("fastedit_format", None) != _FORMAT:
            raise InputError(f"{str(path)!r} is not a fastedit covariance file "
                             f"(no fastedit_format={_FORMAT!r} in its metadata)")
        total, count = tensors.get("sum"), tensors.get("count")
        if total is None or count is None or count.shape != (1,):
            raise InputError(f"{str(path)!r} lacks a 'sum' or a 'count'; recompute the "
                             f"statistics")
        try:
            acc = cls.from_sum(total, int(count[0]), device=device, backend=backend)
        except InputError as exc:
            raise InputError(f"{str(path)!r}: {exc}; recompute the statistics") from exc
        acc.metadata = meta
        return acc

    @classmethod
    def from_sum(cls, total: torch.Tensor, count: int, *, device=None,
                 backend: str | None = None) -> "CovarianceAccumulator":
        """An accumulator holding ``total`` (d_k, d_k) float64 and ``count`` tokens, e.g. after
        an all-reduce of per-rank sums; it can keep accumulating. ``total``'s lower triangle is
        taken (the sum is symmetric by construction); device None keeps total's device."""
        if (not isinstance(total, torch.Tensor) or total.dtype != torch.float64
                or total.ndim != 2 or total.shape[0] != total.shape[1]):
            raise InputError(f"the sum must be a square float64 tensor, got "
                             f"{getattr(total, 'dtype', type(total).__name__)} of shape "
                             f"{tuple(getattr(total, 'shape', ()))}")
        if not isinstance(count, int) or count < 0:
            raise InputError(f"count must be a non-negative int, got {count!r}")
        if not bool(torch.isfinite(total).all()):
            raise InputError("the sum holds NaN/Inf")
        acc = cls(total.shape[0], device=device if device is not None else total.device,
                  backend=backend)
        acc._raw.copy_(total)
        acc._count = count
        return acc

    def __repr__(self) -> str:
        return (f"CovarianceAccumulator(d_k={self.d_k}, count={self._count}, "
                f"device={self.device}, backend={self.backend})")
