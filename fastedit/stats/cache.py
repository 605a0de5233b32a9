"""Where statistics are cached, what their metadata says, and how a cache is checked.

Layout under a cache directory::

    <cache_dir>/<model>/<dataset>/layer_<l>.safetensors          finished: sum, count, metadata
    <cache_dir>/<model>/<dataset>/documents-<digest>.json        the selected document indices
    <cache_dir>/<model>/<dataset>/.checkpoint/<rank>/            an interrupted run's state:
        layer_<l>.partial-<n>.safetensors                        sums after n documents
        progress.json                                            which n is complete

Each finished file holds the un-normalised float64 sum Σ k kᵀ and the token count (through
:meth:`fastedit.linalg.CovarianceAccumulator.save`, an atomic write) and the request in its
metadata. A cache is used only when every field of :data:`MATCH_FIELDS` equals the request;
otherwise :class:`fastedit.errors.CacheMismatchError` names the field. Checkpoint files carry
``complete = "false"`` and a ``.partial-`` name, so neither a reader nor a rename can take one
for a finished file. The checkpoint is committed by rewriting ``progress.json`` atomically
after all its layer files exist, so a crash at any moment leaves a consistent state.
"""
from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import tempfile

import numpy as np
import torch

from fastedit.errors import CacheMismatchError, InputError

#: Metadata fields that must equal the request for a cache to be used.
MATCH_FIELDS = ("format", "model", "revision", "layer", "module", "dataset", "corpus_size", "num_samples",
                "seed", "max_length", "dtype")
FORMAT = "fastedit-covariance-1"


def default_cache_dir() -> pathlib.Path:
    """``$FASTEDIT_CACHE_DIR/stats``, else ``~/.cache/fastedit/stats``."""
    root = os.environ.get("FASTEDIT_CACHE_DIR")
    base = pathlib.Path(root) if root else pathlib.Path.home() / ".cache" / "fastedit"
    return base / "stats"


def slug(name: str) -> str:
    """A file-system-safe directory name for a model or dataset name."""
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", str(name)).strip("._")
    return s or "unnamed"


def stats_dir(cache_dir, model_name: str, dataset: str) -> pathlib.Path:
    return pathlib.Path(cache_dir) / slug(model_name) / slug(dataset)


def layer_path(directory: pathlib.Path, layer: int) -> pathlib.Path:
    return directory / f"layer_{layer}.safetensors"


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
            raise CacheMismatchError(
                f"{path} was collected with {key}={have!r} but this request has {key}={str(want)!r}; "
                "use a different cache directory (--cache-dir / cache_dir=) or recompute it "
                "(--overwrite / overwrite=True)")


def load_checked(path, expected: dict, device=None):
    """The CovarianceAccumulator saved at ``path``, after :func:`check_metadata`."""
    from fastedit.linalg import CovarianceAccumulator

    acc = CovarianceAccumulator.load(path, device=device)
    check_metadata(path, dict(acc.metadata), expected)
    return acc


def write_json_atomic(path: pathlib.Path, payload) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise


class Checkpoint:
    """The rotating checkpoint of one rank's pass: per-layer partial sums after n documents."""

    def __init__(self, directory: pathlib.Path, rank: int = 0, world_size: int = 1):
        self.dir = directory / ".checkpoint" / f"rank{rank}of{world_size}"
        self.progress = self.dir / "progress.json"

    def _file(self, layer: int, n: int) -> pathlib.Path:
        return self.dir / f"layer_{layer}.partial-{n}.safetensors"

    def load(self, layers, request: dict, device=None, backend=None):
        """(accumulators by layer, documents consumed) of the last committed checkpoint, or None.

        A checkpoint made for another request raises CacheMismatchError (the field named).
        """
        from fastedit.linalg import CovarianceAccumulator

        if not self.progress.is_file():
            return None
        state = json.loads(self.progress.read_text())
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
        n = int(state["documents"])
        accs = {l: CovarianceAccumulator.load(self._file(l, n), device=device, backend=backend) for l in layers}
        return accs, n

    def save(self, accs: dict, n: int, request: dict, layer_meta: dict) -> None:
        """Write every layer's partial sum after ``n`` documents, then commit ``progress.json``."""
        self.dir.mkdir(parents=True, exist_ok=True)
        old = json.loads(self.progress.read_text())["documents"] if self.progress.is_file() else None
        for l, acc in accs.items():
            acc.save(self._file(l, n), {**layer_meta[l], "complete": "false", "documents": str(n)})
        write_json_atomic(self.progress, {"documents": n, "layers": [str(l) for l in accs],
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
    except (ValueError, OSError) as exc:
        raise InputError(f"{path} is not a readable .npz file ({exc})") from None
    with data:
        keys = set(data.files)
        if not {"mom2.mom2", "mom2.count"} <= keys:
            raise InputError(f"{path} has no second-moment statistics (keys 'mom2.mom2' and 'mom2.count' expected, "
                             f"found {sorted(keys)}); it is not a reference layer_stats file")
        mom2 = np.asarray(data["mom2.mom2"])
        count = int(np.asarray(data["mom2.count"]))
    if mom2.ndim != 2 or mom2.shape[0] != mom2.shape[1]:
        raise InputError(f"{path}: 'mom2.mom2' must be a square matrix, got shape {mom2.shape}")
    if count <= 0:
        raise InputError(f"{path}: 'mom2.count' is {count}; the file holds no tokens")
    return torch.from_numpy(mom2.astype(np.float64)), count
