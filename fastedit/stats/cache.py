"""Where statistics are cached, what their metadata says, and how a cache is checked.

The one module that writes and reads the statistics layout (the Editor and the testbed call
it too)::

    <cache_dir>/<model>/<dataset>/layer_<l>.safetensors          finished: sum, count, metadata
    <cache_dir>/<model>/<dataset>/documents-<digest>.json        the selected document indices
    <cache_dir>/<model>/<dataset>/nullspace_<l>-<key>.safetensors AlphaEdit's basis of layer l
    <cache_dir>/<model>/<dataset>/.checkpoint/<rank>/            an interrupted run's state:
        layer_<l>.partial-<n>.safetensors                        sums after n documents
        progress.json                                            which n is complete

Each finished file holds the un-normalised float64 sum Σ k kᵀ and the token count (through
:meth:`fastedit.linalg.CovarianceAccumulator.save`: an atomic write with a SHA-256 per
tensor, verified on load) and the request in its metadata. The request names the model by
identity, not only by name: ``weights`` is :func:`weights_fingerprint` (the parameters an edit
never writes), ``module`` and ``d_k`` the rewrite module and its input size; and the corpus by
``content`` (:meth:`fastedit.stats.corpus.Corpus.fingerprint`: the file's bytes, a dataset's
own fingerprint, or the documents read), so a corpus rewritten under the same name and size is
not taken for the old one. A cache is used only when every field of :data:`MATCH_FIELDS` equals
the request; otherwise :class:`fastedit.errors.CacheMismatchError` names the field. A statistics
directory given to an Editor is checked on :data:`IDENTITY_FIELDS` (the model may be loaded
under another name or dtype; its weights decide).

Checkpoint files carry ``complete = "false"`` and a ``.partial-`` name, so neither a reader nor
a rename can take one for a finished file. The checkpoint is committed by rewriting
``progress.json`` atomically after all its layer files exist, so a crash at any moment leaves a
consistent state; temporaries a killed writer left are removed by the next run.
"""
from __future__ import annotations

import hashlib
import pathlib
import re
import shutil
import warnings
import zipfile

import numpy as np
import torch

from fastedit import _io
from fastedit.errors import CacheMismatchError, InputError

#: Metadata fields that must equal the request for a cache to be used.
MATCH_FIELDS = ("format", "model", "revision", "weights", "layer", "module", "d_k", "dataset", "content",
                "corpus_size", "num_samples", "seed", "max_length", "dtype")
#: What identifies the statistics of a model's layer, whatever name or dtype it was loaded under.
IDENTITY_FIELDS = ("format", "weights", "layer", "module", "d_k")
FORMAT = "fastedit-covariance-2"
NULL_SPACE_FORMAT = "fastedit-nullspace-1"
#: Elements sampled from each parameter by :func:`weights_fingerprint`.
FINGERPRINT_SAMPLES = 1024


def default_cache_dir() -> pathlib.Path:
    """``$FASTEDIT_CACHE_DIR/stats``, else ``~/.cache/fastedit/stats``."""
    return _io.cache_root() / "stats"


def slug(name: str) -> str:
    """A file-system-safe directory name for a model or dataset name."""
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", str(name)).strip("._")
    return s or "unnamed"


def stats_dir(cache_dir, model_name: str, dataset: str) -> pathlib.Path:
    return pathlib.Path(cache_dir) / slug(model_name) / slug(dataset)


def layer_path(directory: pathlib.Path, layer: int) -> pathlib.Path:
    return pathlib.Path(directory) / f"layer_{layer}.safetensors"


def weights_fingerprint(model, adapter) -> str:
    """SHA-256 over every parameter an edit never writes (all but the rewrite weights):
    name, shape and :data:`FINGERPRINT_SAMPLES` evenly spaced elements rounded to bfloat16.

    Statistics depend on every weight below the rewrite module, so another checkpoint under
    the same name (a fine-tune) gets another fingerprint; the rewrite weights are left out so
    that an edited model still matches the statistics of the model it was edited from. The
    bfloat16 rounding makes a float32 and a bfloat16 copy of one checkpoint agree. A change
    confined to elements between the samples goes unseen: it identifies, it does not verify.
    """
    rewrite = {id(adapter.weight_param(l)) for l in range(adapter.num_layers)}
    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if id(p) in rewrite:
                continue
            flat = p.detach().reshape(-1)
            n = flat.numel()
            idx = torch.linspace(0, max(n - 1, 0), min(n, FINGERPRINT_SAMPLES), device=flat.device).long()
            sample = flat[idx].float().to(torch.bfloat16).cpu()
            h.update(f"{name}{tuple(p.shape)}".encode())
            h.update(memoryview(sample.view(torch.int16).numpy()))
    return h.hexdigest()


def identity(model, adapter, layer: int) -> dict:
    """The :data:`IDENTITY_FIELDS` of the statistics of ``layer`` for this model."""
    return {"format": FORMAT, "weights": weights_fingerprint(model, adapter), "layer": layer,
            "module": adapter.rewrite_name(layer), "d_k": adapter.d_k}


def check_metadata(path, found: dict, expected: dict) -> None:
    """Raise CacheMismatchError naming the first field where ``found`` differs from ``expected``.

    Only the fields present in ``expected`` are compared (a reader may leave some open).
    """
    if found.get("complete", "true") != "true":
        raise CacheMismatchError(f"{path} is an unfinished checkpoint (metadata field 'complete' is "
                                 f"{found.get('complete')!r}), not finished statistics; rerun the "
                                 "collection to finish it, or pass --overwrite to start over")
    for key, want in expected.items():
        have = found.get(key)
        if have != str(want):
            if key == "format":
                why = (f"{path} was written in format {have!r}, not {FORMAT!r} (by another fastedit version, "
                       "or it is no statistics file)")
            elif key in ("weights", "module", "d_k"):
                why = (f"{path} holds the statistics of another model: it was collected with {key}={have!r} "
                       f"but this model has {key}={str(want)!r}")
            else:
                why = f"{path} was collected with {key}={have!r} but this request has {key}={str(want)!r}"
            raise CacheMismatchError(f"{why}; use a different cache directory (--cache-dir / cache_dir=) or "
                                     "recompute it (--overwrite / overwrite=True)")


def load_checked(path, expected: dict, device=None):
    """The CovarianceAccumulator saved at ``path`` (checksums verified), after
    :func:`check_metadata`."""
    from fastedit.linalg import CovarianceAccumulator

    acc = CovarianceAccumulator.load(path, device=device)
    check_metadata(path, dict(acc.metadata), expected)
    return acc


def file_format(path) -> str | None:
    """The ``format`` field of a statistics file, read from its header."""
    return _io.read_metadata(path).get("format")


def save_layer(path, acc, metadata: dict) -> None:
    """Write finished statistics (``complete = "true"``) with their request metadata."""
    acc.save(path, {**metadata, "complete": "true"})


def load_directory(directory, layer: int, expected: dict, *, device=None):
    """The statistics of ``layer`` in a directory made by :func:`fastedit.stats.collect_stats`
    (``fastedit stats``), checked against ``expected`` (usually :func:`identity`): a file made
    for another model, module, d_k or layer, an unfinished or damaged one is refused."""
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        raise InputError(f"stats={str(directory)!r} is not a directory; pass {{layer: C0}} or the directory "
                         "holding layer_<l>.safetensors made by `fastedit stats`")
    path = layer_path(directory, layer)
    if not path.is_file():
        raise InputError(f"no statistics for layer {layer} in {directory} (expected {path.name}); collect them "
                         f"with `fastedit stats --layers {layer} ...` and pass the directory holding the files")
    return load_checked(path, expected, device=device)


def check_directory(directory, layers) -> None:
    """Refuse, from the file headers alone (no model needed, so before one loads), a statistics
    directory that lacks a finished file of the current format for any of ``layers``. The
    model-identity check is :func:`load_directory`'s, once the model is there."""
    directory = pathlib.Path(directory).expanduser()
    if not directory.is_dir():
        raise InputError(f"statistics directory {str(directory)!r} is not a directory; pass the directory "
                         "holding layer_<l>.safetensors written by `fastedit stats`")
    missing = [l for l in layers if not layer_path(directory, l).is_file()]
    if missing:
        raise InputError(f"{directory} has no statistics for layer(s) {', '.join(map(str, missing))} (the edit "
                         f"writes layers {', '.join(map(str, layers))}); collect them with "
                         f"`fastedit stats --layers {','.join(map(str, layers))} ...`")
    for l in layers:
        path = layer_path(directory, l)
        check_metadata(path, _io.read_metadata(path), {"format": FORMAT, "layer": l})


def _null_space_key(stats_path, threshold: float) -> tuple[pathlib.Path, dict]:
    meta = _io.read_metadata(stats_path)
    key = {"format": NULL_SPACE_FORMAT, "layer": meta.get("layer", ""), "threshold": repr(float(threshold)),
           "stats_sum_sha256": _io.checksum(meta, "sum") or "", "stats_count_sha256": _io.checksum(meta, "count") or ""}
    digest = hashlib.sha256(repr(sorted(key.items())).encode()).hexdigest()[:16]
    path = pathlib.Path(stats_path).parent / f"nullspace_{key['layer']}-{digest}.safetensors"
    return path, key


def null_space(directory, layer: int, C0: torch.Tensor, threshold: float, *, write: bool = True):
    """AlphaEdit's :class:`fastedit.linalg.NullSpace` of C0 (the mean of ``layer``'s statistics
    in ``directory``) for ``threshold``, read from ``nullspace_<l>-<key>.safetensors`` beside the
    statistics when present, else computed (one float64 eigh of d_k × d_k) and written there.

    The file is keyed by the statistics file's stored checksums and the threshold (the key's
    digest is in its name and its fields in its metadata), and its tensors carry checksums:
    a file whose metadata disagrees with the key is refused (CacheMismatchError), a damaged one
    is an InputError. A directory that cannot be written is only warned about.
    """
    from fastedit.linalg import NullSpace

    path, key = _null_space_key(layer_path(directory, layer), threshold)
    if not key["stats_sum_sha256"]:
        return NullSpace.from_covariance(C0, threshold=threshold, layer=layer)
    if path.is_file():
        tensors, meta = _io.load_tensors(path)
        check_metadata(path, meta, key)
        if set(tensors) != {"Q", "eigenvalues"}:
            raise InputError(f"{path} does not hold a null-space basis (tensors Q, eigenvalues); delete it")
        return NullSpace.from_basis(tensors["Q"].to(C0.device), tensors["eigenvalues"].to(C0.device), threshold,
                                    layer=layer)
    ns = NullSpace.from_covariance(C0, threshold=threshold, layer=layer)
    if write:
        try:
            _io.save_tensors(path, {"Q": ns.Q, "eigenvalues": ns.eigenvalues}, key)
        except OSError as exc:
            warnings.warn(f"the null-space basis of layer {layer} could not be cached in {path.parent} ({exc}); "
                          "it will be computed again next time", stacklevel=2)
    return ns


class Checkpoint:
    """The rotating checkpoint of one rank's pass: per-layer partial sums after n documents."""

    def __init__(self, directory: pathlib.Path, rank: int = 0, world_size: int = 1):
        self.dir = directory / ".checkpoint" / f"rank{rank}of{world_size}"
        self.progress = self.dir / "progress.json"

    def _file(self, layer: int, n: int) -> pathlib.Path:
        return self.dir / f"layer_{layer}.partial-{n}.safetensors"

    def _state(self) -> dict:
        state = _io.read_json(self.progress, "the checkpoint record")
        ok = (isinstance(state, dict) and type(state.get("documents")) is int and state["documents"] >= 0
              and isinstance(state.get("layers"), list) and isinstance(state.get("request"), dict))
        if not ok:
            raise InputError(f"the checkpoint record {str(self.progress)!r} is damaged (it must hold 'documents', "
                             "'layers' and 'request'); delete it, or start over with --overwrite")
        return state

    def load(self, layers, request: dict, device=None, backend=None):
        """(accumulators by layer, documents consumed) of the last committed checkpoint, or None.

        A checkpoint made for another request raises CacheMismatchError (the field named); a
        damaged record or partial file raises InputError naming it.
        """
        from fastedit.linalg import CovarianceAccumulator

        _io.remove_stale_temporaries(self.dir)
        if not self.progress.is_file():
            return None
        state = self._state()
        for key, want in request.items():
            if state["request"].get(key) != str(want):
                raise CacheMismatchError(
                    f"the interrupted run in {self.dir} was collecting {key}={state['request'].get(key)!r} but this "
                    f"request has {key}={str(want)!r}; use a different cache directory (--cache-dir) or start "
                    "over (--overwrite)")
        missing = [l for l in layers if str(l) not in state["layers"]]
        if missing:
            raise CacheMismatchError(
                f"the interrupted run in {self.dir} collected layers {sorted(map(int, state['layers']))}, "
                f"not {missing}; request the same layers to resume, or start over (--overwrite)")
        n = state["documents"]
        accs = {l: CovarianceAccumulator.load(self._file(l, n), device=device, backend=backend) for l in layers}
        return accs, n

    def save(self, accs: dict, n: int, request: dict, layer_meta: dict) -> None:
        """Write every layer's partial sum after ``n`` documents, then commit ``progress.json``."""
        _io.ensure_directory(self.dir, "the checkpoint directory")
        old = self._state()["documents"] if self.progress.is_file() else None
        for l, acc in accs.items():
            acc.save(self._file(l, n), {**layer_meta[l], "complete": "false", "documents": str(n)})
        _io.write_json(self.progress, {"documents": n, "layers": [str(l) for l in accs],
                                       "request": {k: str(v) for k, v in request.items()}})
        if old is not None and old != n:
            for l in accs:
                self._file(l, old).unlink(missing_ok=True)

    def clear(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        try:
            self.dir.parent.rmdir()  # only when no other rank's checkpoint is left in it
        except OSError:
            pass


def read_reference_npz(path) -> tuple[torch.Tensor, int]:
    """(sum, count) from a statistics file of the reference implementations (ROME/MEMIT/
    AlphaEdit ``layer_stats``): an ``.npz`` of their ``CombinedStat(mom2=SecondMoment())``
    state, with keys ``mom2.mom2`` (Σ k kᵀ, (d_k, d_k), usually float32), ``mom2.count``
    (tokens) and ``mom2.constructor``. The sum is returned as float64 (the file's float32
    rounding stays in it)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise InputError(f"statistics file {str(path)!r} does not exist")
    try:
        data = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise InputError(f"{path} is not a readable .npz file ({exc})") from None
    with data:
        keys = set(data.files)
        if not {"mom2.mom2", "mom2.count"} <= keys:
            raise InputError(f"{path} has no second-moment statistics (keys 'mom2.mom2' and 'mom2.count' expected, "
                             f"found {sorted(keys)}); it is not a reference layer_stats file")
        try:
            mom2 = np.asarray(data["mom2.mom2"])
            count = np.asarray(data["mom2.count"])
        except ValueError as exc:  # numpy refuses object (pickled) arrays with allow_pickle=False
            raise InputError(f"{path}: 'mom2.mom2' or 'mom2.count' is stored as pickled Python objects, which "
                             f"fastedit never loads (unpickling can run code) ({exc}); re-save the arrays as "
                             "plain numbers with numpy.savez") from None
    if mom2.dtype.kind not in "fiu" or count.dtype.kind not in "iuf" or count.size != 1:
        raise InputError(f"{path}: 'mom2.mom2' must be a numeric matrix and 'mom2.count' one number, got dtypes "
                         f"{mom2.dtype} and {count.dtype} (size {count.size})")
    count = int(count.reshape(()))
    if mom2.ndim != 2 or mom2.shape[0] != mom2.shape[1]:
        raise InputError(f"{path}: 'mom2.mom2' must be a square matrix, got shape {mom2.shape}")
    if count <= 0:
        raise InputError(f"{path}: 'mom2.count' is {count}; the file holds no tokens")
    if not np.isfinite(mom2).all():
        raise InputError(f"{path}: 'mom2.mom2' holds NaN or Inf (float32 overflow in the reference's pass, or a "
                         "damaged file); recompute the statistics")
    return torch.from_numpy(mom2.astype(np.float64)), count
