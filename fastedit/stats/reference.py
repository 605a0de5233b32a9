"""The reference implementations' statistics directories, read and written.

ROME/MEMIT/AlphaEdit's ``layer_stats`` keep one ``.npz`` per layer::

    <stats_dir>/<model_name>/<dataset>_stats/<rewrite module>_<dtype>_mom2[_t<tokens>][_<n_samples>].npz

holding their ``CombinedStat(mom2=SecondMoment())`` state: ``mom2.mom2`` = Σ k kᵀ in ``dtype``
(float32 in every published config), ``mom2.count`` = tokens, ``mom2.constructor``, and the
``sample_size`` the file was collected for. ``<model_name>`` is ``_name_or_path`` with "/"
replaced by "_" in MEMIT/AlphaEdit and its last path component in EasyEdit, so files are found
by their rewrite-module name under the directory given, whatever sits between.

Normalisation (matched exactly): the references use ``SecondMoment.moment()`` = ``mom2 / count``
computed in the file's dtype, then ``.double()`` before multiplying by λ (MEMIT) or the SVD
(AlphaEdit). :meth:`ReferenceStats.covariance` does the same division in the same dtype, so C0
is bit for bit the reference's, float32 rounding of the division included.
"""
from __future__ import annotations

import os
import pathlib
import re

import numpy as np
import torch

from fastedit import _io
from fastedit.errors import InputError
from fastedit.stats.cache import read_reference_npz

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}
# The reference's encoding of None in an .npz (runningstats' nan-boxing): the NaN 0xfff8000000000002.
_NULL = np.frombuffer(np.array(0xFFF8000000000002, dtype=np.uint64).tobytes(), dtype=np.float64)[0]


def _npz_name(module: str, dtype: str, n_samples: int | None) -> str:
    return f"{module}_{dtype}_mom2" + ("" if n_samples is None else f"_{int(n_samples)}") + ".npz"


class ReferenceStats:
    """C0 per layer from a reference statistics directory (see the module docstring).

    ``directory``: the references' ``stats_dir`` (or any folder below it that holds the files).
    ``dataset``, ``n_samples``, ``dtype``: narrow the choice when several files match a layer
    (``mom2_dataset``, ``mom2_n_samples``, ``mom2_dtype`` of the hyper-parameter file).
    Pass it as ``Editor(stats=ReferenceStats(...))``; a plain directory path holding such files
    and no fastedit statistics is recognised by the Editor too.
    """

    def __init__(self, directory, *, dataset: str | None = None, n_samples: int | None = None,
                 dtype: str | None = None):
        self.directory = pathlib.Path(directory)
        if not self.directory.is_dir():
            raise InputError(f"reference statistics directory {str(self.directory)!r} does not exist")
        self.dataset, self.n_samples, self.dtype = dataset, n_samples, dtype

    def __eq__(self, other) -> bool:
        return isinstance(other, ReferenceStats) and (self.directory.resolve(), self.dataset, self.n_samples,
                                                      self.dtype) == (other.directory.resolve(), other.dataset,
                                                                      other.n_samples, other.dtype)

    __hash__ = None

    @classmethod
    def from_config(cls, config, directory=None) -> "ReferenceStats":
        """From a :class:`~fastedit.compat.ReferenceConfig` (its ``stats_dir`` unless ``directory``)."""
        s = config.stats
        d = directory if directory is not None else s.get("stats_dir")
        if d is None:
            raise InputError(f"{config.source or 'hyper-parameters'}: no stats_dir; pass the directory of the "
                             "reference statistics")
        return cls(d, dataset=s.get("dataset"), n_samples=s.get("n_samples"), dtype=s.get("dtype"))

    def path(self, module: str) -> pathlib.Path:
        """The one ``.npz`` of rewrite module ``module`` (e.g. ``transformer.h.13.mlp.c_proj``)."""
        pattern = re.compile(re.escape(module) + r"_(float16|bfloat16|float32|float64)_mom2(_t\d+|_t\{batch_tokens\})?(_\d+)?\.npz")
        found = []
        for p in self.directory.rglob(f"{module}_*.npz"):
            m = pattern.fullmatch(p.name)
            if m is None:
                continue
            if self.dtype is not None and m.group(1) != self.dtype:
                continue
            if self.n_samples is not None and m.group(3) != f"_{int(self.n_samples)}":
                continue
            if self.dataset is not None and p.parent.name != f"{self.dataset}_stats":
                continue
            found.append(p)
        if not found:
            want = _npz_name(module, self.dtype or "<dtype>", self.n_samples)
            raise InputError(f"no reference statistics for {module!r} under {self.directory} (expected "
                             f"<model>/{self.dataset or '<dataset>'}_stats/{want})")
        if len(found) > 1:
            raise InputError(f"several reference statistics files for {module!r} under {self.directory}: "
                             f"{', '.join(str(p) for p in sorted(found))}; pass dataset=, n_samples= or dtype= "
                             "(the mom2_* keys of the hyper-parameters) or a narrower directory")
        return found[0]

    def covariance(self, layer: int, adapter) -> torch.Tensor:
        """C0 of ``layer`` (d_k, d_k) float64: the reference's ``(mom2 / count).double()``, the
        division done in the file's dtype."""
        path = self.path(adapter.rewrite_name(layer))
        mom2, count = read_reference_npz(path)
        dtype = _DTYPES[re.search(r"_(float16|bfloat16|float32|float64)_mom2", path.name).group(1)]
        return (mom2.to(dtype) / count).to(torch.float64)


def is_reference_dir(stats) -> bool:
    """True for a directory holding reference ``*_mom2*.npz`` files and no fastedit
    ``layer_<l>.safetensors`` (which the Editor reads itself)."""
    if not isinstance(stats, (str, os.PathLike)):
        return False
    d = pathlib.Path(stats)
    if not d.is_dir() or any(d.glob("layer_*.safetensors")):
        return False
    return next(d.rglob("*_mom2*.npz"), None) is not None


def export_reference_stats(stats: dict, directory, model, *, model_name: str | None = None,
                           dataset: str = "wikipedia", n_samples: int | None = 100000,
                           dtype: str = "float32") -> dict:
    """Write fastedit statistics as the references' ``layer_stats`` files, so that their code
    (or :class:`ReferenceStats`) loads them without recomputing.

    stats: {layer: CovarianceAccumulator} (what :func:`fastedit.stats.collect_stats` returns).
    Writes ``<directory>/<model_name>/<dataset>_stats/<module>_<dtype>_mom2_<n_samples>.npz`` with
    ``mom2.mom2`` = the float64 sum rounded to ``dtype``, ``mom2.count`` and ``sample_size`` =
    ``n_samples`` (the reference reloads a file only when its sample_size equals the request's).
    ``model_name`` defaults to ``_name_or_path`` with "/" → "_" (MEMIT/AlphaEdit's choice).
    Returns {layer: path}.
    """
    from fastedit.linalg import CovarianceAccumulator
    from fastedit.models import get_adapter

    if dtype not in ("float32", "float64"):
        raise InputError(f"dtype must be 'float32' or 'float64' (the references' mom2_dtype), got {dtype!r}")
    adapter = get_adapter(model)
    name = model_name or (getattr(getattr(model, "config", None), "_name_or_path", "") or "").replace("/", "_")
    if not name:
        raise InputError("the model has no _name_or_path; pass model_name= (the references' folder name)")
    folder = pathlib.Path(directory) / name / f"{dataset}_stats"
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for layer, acc in stats.items():
        if not isinstance(acc, CovarianceAccumulator):
            raise InputError(f"stats[{layer}] must be a CovarianceAccumulator (the un-normalised sum and the token "
                             f"count are what the reference stores), got {type(acc).__name__}")
        S, count = acc.sum.to("cpu", torch.float64), int(acc.count)
        path = folder / _npz_name(adapter.rewrite_name(layer), dtype, n_samples)
        arrays = {"mom2.constructor": np.array("util.runningstats.SecondMoment()"), "mom2.count": np.array(count),
                  "mom2.mom2": S.numpy().astype(dtype),
                  "sample_size": np.array(n_samples) if n_samples is not None else np.array(_NULL)}

        def write(tmp, arrays=arrays):
            with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a path
                np.savez(f, **arrays)

        _io.atomic_write(path, write)
        out[layer] = path
    return out
