"""The Editor: sequential batches of edits applied transactionally, with a report per batch.

    editor = Editor(model, tok, method="alphaedit", strategy="blue", nas=True,
                    hparams=fastedit.presets.get("llama3-8b", method="alphaedit", strategy="blue"),
                    stats={layer: C0, ...})
    report = editor.edit(requests, batch_size=100)
    editor.restore()          # the original weights back

Each batch snapshots the weights of the layers it may write. If anything fails inside the batch
(including KeyboardInterrupt), those weights are copied back bit for bit, the solvers' sequential
state (accumulated keys, C_p) is rolled back, and :class:`fastedit.errors.EditError` is raised
naming the stage and the requests, with the original exception chained. Earlier batches of the
same call stay applied; the error carries their report as ``exc.report``.

A KeyboardInterrupt is rolled back the same way and then re-raised as itself (so
``except Exception`` never swallows Ctrl-C), carrying ``exc.report`` and ``exc.edit_error``
(the EditError naming stage and requests). With ``regularizer="prune"`` the whole call is one
transaction: PRUNE rewrites every batch's update at the end, so a failure in any batch or in
PRUNE restores the weights, the sequential state and PRUNE's running total to what they were
before the call (``report.rolled_back`` is then True).
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field

import torch

from fastedit._hf import context_length
from fastedit.editing.context import check_templates, context_templates, flatten
from fastedit.editing.hparams import EditParams
from fastedit.editing.methods import (METHODS, REGULARIZERS, STRATEGIES, STRATEGY_FUNCS, BatchRun, anchor_layer,
                                      edited_layers, make_solver)
from fastedit.editing.nas import AnchorCache, anchor_key, choose_sample, estimate_anchor, weight_fingerprint
from fastedit.editing.regularizers import prune_restrain
from fastedit.editing.requests import Request, check_context_fit, validate_requests
from fastedit.errors import EditError, FastEditError, InputError
from fastedit.models import get_adapter
from fastedit.stats import cache as stats_cache
from fastedit.stats.reference import ReferenceStats, is_reference_dir


@dataclass
class BatchReport:
    """What one batch did. ``layers`` maps an edited layer to ‖ΔW‖, weight norms and the number
    of keys; ``vstar`` maps a target layer to per-edit v* steps, losses and ‖δ‖; ``edited`` lists
    the requests some layer's (non-zero) ΔW was solved for; ``dropped`` the edits NAS left out,
    before any layer was written, so never edited; ``times`` is seconds per stage (targets, keys,
    solve, apply, state)."""

    index: int
    requests: list
    case_ids: list
    edited: list
    dropped: list
    vstar: dict
    layers: dict
    times: dict
    seconds: float
    #: {layer: ΔW (d, d_k)} that landed in the weights, float32 or wider (Editor(record_deltas=True))
    deltas: dict | None = field(default=None, repr=False)

    def to_dict(self) -> dict:
        return {"index": self.index, "requests": self.requests, "case_ids": _jsonable(self.case_ids),
                "edited": self.edited, "dropped": _jsonable(self.dropped),
                "vstar": {str(k): v for k, v in self.vstar.items()},
                "layers": {str(k): v for k, v in self.layers.items()}, "times": self.times,
                "seconds": self.seconds}


@dataclass
class EditReport:
    """The report of one :meth:`Editor.edit` call: configuration, batches, totals."""

    config: dict
    batches: list = field(default_factory=list)
    anchors: dict = field(default_factory=dict)
    prune: dict = field(default_factory=dict)
    weight_norms: dict = field(default_factory=dict)
    seconds: float = 0.0
    prepare_seconds: float = 0.0
    rolled_back: bool = False

    @property
    def n_edited(self) -> int:
        return sum(len(b.edited) for b in self.batches)

    @property
    def dropped(self) -> list:
        return [d for b in self.batches for d in b.dropped]

    def times(self) -> dict:
        total: dict[str, float] = {}
        for b in self.batches:
            for k, v in b.times.items():
                total[k] = total.get(k, 0.0) + v
        return total

    def to_dict(self) -> dict:
        return {"config": self.config, "n_requests": sum(len(b.requests) for b in self.batches),
                "n_edited": self.n_edited, "n_dropped": len(self.dropped),
                "anchors": {str(k): v for k, v in self.anchors.items()}, "prune": {str(k): v for k, v in self.prune.items()},
                "weight_norms": {str(k): v for k, v in self.weight_norms.items()},
                "times": self.times(), "seconds": self.seconds, "prepare_seconds": self.prepare_seconds,
                "edits_per_second": (self.n_edited / self.seconds) if self.seconds > 0 else None,
                "rolled_back": self.rolled_back,
                "batches": [b.to_dict() for b in self.batches]}

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)


def _jsonable(x):
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return str(x)


class Editor:
    """Edits a Hugging Face causal LM in place with MEMIT / MEMIT_seq / AlphaEdit × distribute / BLUE.

    Args:
        model, tokenizer: the model to edit (in place) and its tokenizer.
        method: ``"alphaedit"`` | ``"memit"`` | ``"memit_seq"`` (see :mod:`fastedit.editing.methods`).
        strategy: ``"distribute"`` (MEMIT's layer loop) | ``"blue"`` (first and last critical layer).
        nas: rescale value vectors to the norm anchor and drop outliers (:mod:`fastedit.editing.nas`).
        regularizer: None | ``"rect"`` (keep the top ``rect_keep`` relative changes of each ΔW) |
            ``"prune"`` (restrain the total update's large singular values after each ``edit`` call).
        hparams: an :class:`EditParams`, or a preset name (specialised to method × strategy).
        stats: {layer: C0 (d_k, d_k)} per-token mean covariances of the rewrite-module inputs, for
            every edited layer (tensors or CovarianceAccumulators, e.g. ``collect_stats(...)``), or
            the directory holding the ``layer_<l>.safetensors`` files :mod:`fastedit.stats` writes
            (refused when collected for another model: weights, module, d_k or layer differ; with
            AlphaEdit the null-space basis is cached beside them, see
            :func:`fastedit.stats.cache.null_space`), or the references' ``.npz`` statistics (a
            directory, or :class:`fastedit.compat.ReferenceStats`).
        layers: overrides ``hparams.layers`` (and resets ``blue_layers`` to its ends).
        device: moves the model there first when given.
        progress: show a tqdm bar over the edits.
        cache_dir: where NAS anchors are cached on disk (memory only when None).
        layout: the model's module layout, over the built-in one of its family (a
            :class:`fastedit.models.Layout`, a dict, a JSON file or ``"field=template,..."``;
            see :func:`fastedit.models.get_adapter`). Needed for families without a built-in one.
        context_templates: fixed context templates ``[["{}"], ["<prefix> {}", ...]]`` instead of the
            ones generated from the model (as returned by :func:`fastedit.editing.context_templates`).
        record_deltas: keep each batch's ΔW per layer in ``BatchReport.deltas``.
    """

    def __init__(self, model, tokenizer, method: str = "alphaedit", strategy: str = "distribute", nas: bool = False,
                 regularizer: str | None = None, hparams: EditParams | str | None = None, stats=None,
                 layers=None, device=None, progress: bool = True, cache_dir=None, layout=None,
                 context_templates=None, record_deltas: bool = False):
        if method not in METHODS:
            raise InputError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
        if strategy not in STRATEGIES:
            raise InputError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
        if regularizer not in REGULARIZERS:
            raise InputError(f"regularizer must be one of None, 'rect', 'prune'; got {regularizer!r}")
        if hparams is None:
            raise InputError("pass hparams: an EditParams or a preset name such as 'llama3-8b' "
                             "(see fastedit.presets.names())")
        if isinstance(hparams, str):
            from fastedit.editing import presets

            hparams = presets.get(hparams, method=method, strategy=strategy)
        if not isinstance(hparams, EditParams):
            raise InputError(f"hparams must be an EditParams or a preset name, got {type(hparams).__name__}")
        if layers is not None:
            hparams = hparams.replace(layers=tuple(layers), blue_layers=None)
        if device is not None:
            model.to(device)
        self.model, self.tok = model, tokenizer
        self.method, self.strategy, self.nas, self.regularizer = method, strategy, bool(nas), regularizer
        self.hparams = hparams
        self.progress = progress
        self.adapter = get_adapter(model, layout)
        self.edit_layers = edited_layers(strategy, hparams)
        if strategy == "blue" and len(set(self.edit_layers)) != len(self.edit_layers):
            raise InputError(f"BLUE edits its first and last critical layers, but both are layer {self.edit_layers[0]} "
                             "(one critical layer); use strategy='distribute', which edits a single layer once "
                             "exactly as a one-layer BLUE would, or give two layers")
        for l in (*hparams.layers, *hparams.boundary_layers):
            self.adapter.check_layer(l)
        self._stats = stats
        self._solvers: dict = {}
        self._templates = None if context_templates is None else check_templates(context_templates)
        self.record_deltas = bool(record_deltas)
        self._anchor_cache = AnchorCache(cache_dir)
        self._anchors: dict[int, float] = {}
        self._anchor_info: dict[int, dict] = {}
        self._originals = {l: self.adapter.weight_param(l).detach().clone() for l in self.edit_layers}
        self._fingerprints = {l: weight_fingerprint(model, self.adapter, l) for l in self.edit_layers}
        self._raw_delta: dict = {}
        self._stats_identity: dict | None = None
        self._broken: str | None = None
        self.batches_done = 0

    # ---------------------------------------------------------------- set-up
    @property
    def config(self) -> dict:
        return {"method": self.method, "strategy": self.strategy, "nas": self.nas, "regularizer": self.regularizer,
                "edit_layers": list(self.edit_layers), "hparams": self.hparams.to_dict(),
                "model": type(self.model).__name__}

    def _sync(self) -> None:
        if self.adapter.device.type == "cuda":
            torch.cuda.synchronize(self.adapter.device)

    def _max_length(self):
        return context_length(self.model)

    def covariance(self, layer: int) -> torch.Tensor:
        """C0 of ``layer`` (d_k, d_k), float64 on the layer's weight device, from ``stats``."""
        stats = self._stats
        if stats is None:
            raise InputError(f"{self.method} needs the covariance C0 of the rewrite-module inputs at layer {layer}: "
                             "pass stats={layer: C0} or a statistics directory made by `fastedit stats`")
        if isinstance(stats, dict):
            if layer not in stats:
                raise InputError(f"stats has no covariance for layer {layer} (it has layers {sorted(stats)}); "
                                 f"give one for every edited layer {list(self.edit_layers)}")
            C0 = stats[layer]
            if hasattr(C0, "mean") and hasattr(C0, "count"):  # a CovarianceAccumulator
                C0 = C0.mean()
        elif isinstance(stats, ReferenceStats) or is_reference_dir(stats):
            C0 = (stats if isinstance(stats, ReferenceStats) else ReferenceStats(stats)).covariance(layer, self.adapter)
        elif isinstance(stats, (str, os.PathLike)):
            C0 = stats_cache.load_directory(stats, layer, self._identity(layer)).mean()
        else:
            raise InputError(f"stats must be a dict {{layer: C0}}, a statistics directory or ReferenceStats, got "
                             f"{type(stats).__name__}")
        C0 = torch.as_tensor(C0).to(device=self.adapter.layer_device(layer), dtype=torch.float64)
        d_k = self.adapter.d_k
        if C0.shape != (d_k, d_k):
            raise InputError(f"stats for layer {layer} has shape {tuple(C0.shape)}, expected ({d_k}, {d_k})")
        if not torch.isfinite(C0).all():
            raise InputError(f"stats for layer {layer} contains NaN or Inf; recompute the statistics")
        return C0

    def _identity(self, layer: int) -> dict:
        """What a statistics file must record to be this model's statistics of ``layer``."""
        if self._stats_identity is None:
            self._stats_identity = stats_cache.identity(self.model, self.adapter, layer)
        return {**self._stats_identity, "layer": layer, "module": self.adapter.rewrite_name(layer)}

    def _solver(self, layer: int):
        C0 = self.covariance(layer)
        null_space = None
        # The basis is cached beside fastedit's own statistics files (not the references' .npz).
        if self.method == "alphaedit" and isinstance(self._stats, (str, os.PathLike)) \
                and not is_reference_dir(self._stats):
            null_space = stats_cache.null_space(self._stats, layer, C0, self.hparams.nullspace_threshold)
        return make_solver(self.method, C0, self.hparams, layer, null_space=null_space)

    def _prepare(self, requests: list, nas_requests, report: EditReport) -> None:
        """Templates, solvers and NAS anchors: everything computed on the unedited model, once."""
        if self._templates is None:
            self._templates = context_templates(self.model, self.tok, n=self.hparams.context_n,
                                                length=self.hparams.context_length, seed=0)
        for l in self.edit_layers:
            if l not in self._solvers:
                self._solvers[l] = self._solver(l)
        if self.nas:
            anchor_layers = (anchor_layer(self.strategy, self.hparams),)
            sample = choose_sample(list(nas_requests) if nas_requests is not None else requests,
                                   self.hparams.nas_sample_size, self.hparams.nas_seed)
            for l in anchor_layers:
                if l in self._anchors:
                    continue
                fp = self._fingerprints.get(l) or weight_fingerprint(self.model, self.adapter, l)
                key = anchor_key(fp, l, self.hparams, sample)
                entry = self._anchor_cache.get(key)
                if entry is None:
                    if self.batches_done:
                        raise InputError(f"NAS needs the anchor of layer {l}, which must be estimated on the "
                                         "unedited model; call restore() first or use a new Editor")
                    mu, info = estimate_anchor(self.model, self.tok, self.adapter, sample, l, hparams=self.hparams,
                                               progress=self.progress)
                    entry = {"mu": mu, "layer": l, "model": fp, **info}
                    self._anchor_cache.put(key, entry)
                self._anchors[l] = float(entry["mu"])
                self._anchor_info[l] = entry
        report.anchors = dict(self._anchor_info)

    # ---------------------------------------------------------------- editing
    def edit(self, requests, batch_size: int = 100, *, nas_requests=None) -> EditReport:
        """Apply ``requests`` in sequential batches of ``batch_size``; returns an :class:`EditReport`.

        ``nas_requests``: the sample whose v* norms set the NAS anchors (default: the first batch).
        Raises :class:`EditError` (weights of the failing batch restored) naming stage and request;
        a KeyboardInterrupt is re-raised as itself after the same rollback, with ``.report`` and
        ``.edit_error`` attached (see the module docstring, also for PRUNE's one transaction).
        """
        t_start = time.perf_counter()
        if self._broken:
            raise EditError(self._broken, stage="state")
        requests = self._coerce(requests)
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise EditError(f"batch_size must be a positive integer, got {batch_size!r}", stage="validate")
        self._validate(requests)
        report = EditReport(config=self.config)
        try:
            self._prepare(requests, nas_requests if nas_requests is not None else requests[:batch_size], report)
        except FastEditError as exc:
            raise EditError(f"preparing the edit failed (nothing was changed): {exc}", stage="prepare") from exc
        except Exception as exc:
            raise EditError(f"preparing the edit failed (nothing was changed): {type(exc).__name__}: {exc}",
                            stage="prepare") from exc
        self._validate_fit(requests)
        report.prepare_seconds = time.perf_counter() - t_start
        call = _CallUndo(self) if self.regularizer == "prune" else None
        bar = _progress(len(requests), self.progress, f"{self.method}/{self.strategy}")
        try:
            for start in range(0, len(requests), batch_size):
                stop = min(start + batch_size, len(requests))
                report.batches.append(self._edit_batch(requests, start, stop, call))
                bar.update(len(report.batches[-1].requests))
            if self.regularizer == "prune":
                report.prune = self._prune()
        except BaseException as exc:
            if call is not None:
                report.rolled_back = call.undo()
            exc.report = report
            if isinstance(exc, EditError) and report.rolled_back:
                raise EditError(f"{exc}; regularizer='prune' makes edit() one transaction, so the "
                                f"{len(report.batches)} earlier batch(es) of this call were undone too: the weights "
                                "are as before the call", request_index=exc.request_index, stage=exc.stage) from exc
            raise
        finally:
            bar.close()
        report.weight_norms = self.weight_norms()
        report.seconds = time.perf_counter() - t_start
        return report

    def _coerce(self, requests) -> list:
        if isinstance(requests, (Request, dict)):
            requests = [requests]
        try:
            return [r if isinstance(r, Request) else Request.from_dict(r, index=i) for i, r in enumerate(requests)]
        except (InputError, TypeError) as exc:
            raise EditError(f"invalid request: {exc}", stage="validate") from exc

    def _validate(self, requests: list) -> None:
        max_len = self._max_length()
        try:
            validate_requests(requests, self.tok, max_len)
        except InputError as exc:
            index = None
            for i, r in enumerate(requests):
                try:
                    validate_requests([r], self.tok, max_len)
                except InputError:
                    index = i
                    break
            raise EditError(f"validation failed, nothing was changed: {exc}", request_index=index,
                            stage="validate") from exc

    def _validate_fit(self, requests: list) -> None:
        """Every v* row (context prefix + prompt + target) fits the model's context."""
        try:
            check_context_fit(requests, self.tok, self._max_length(), flatten(self._templates))
        except InputError as exc:
            raise EditError(f"validation failed, nothing was changed: {exc}", stage="validate") from exc

    def _edit_batch(self, requests: list, start: int, stop: int, call: "_CallUndo | None" = None) -> BatchReport:
        t0 = time.perf_counter()
        batch = requests[start:stop]
        params = {l: self.adapter.weight_param(l) for l in self.edit_layers}
        snapshot = {l: p.detach().clone() for l, p in params.items()}
        run = BatchRun(model=self.model, tok=self.tok, adapter=self.adapter, requests=batch,
                       templates=self._templates, hparams=self.hparams, solvers=self._solvers,
                       anchors=self._anchors if self.nas else None,
                       regularizer="rect" if self.regularizer == "rect" else None, sync=self._sync)
        accumulated = []
        try:
            STRATEGY_FUNCS[self.strategy](run)
            written = [l for l in self.edit_layers if l in run.layers]
            if written and self._solvers[written[0]].sequential:
                # The keys each layer was solved with equal the keys of the edited model (see
                # fastedit.editing.methods), which AlphaEdit's C_p takes.
                run.stage = "state"
                for l in written:
                    self._solvers[l].accumulate(run.solved_keys[l])
                    accumulated.append((l, run.solved_keys[l]))
            if self.regularizer == "prune":
                run.stage = "state"
                acc = torch.promote_types(self.adapter.dtype, torch.float32)
                raw = {l: self._raw_delta.get(l, 0) + (self._dk(params[l].detach()).to(acc) - self._dk(snapshot[l]).to(acc))
                       for l in written}
                self._raw_delta.update(raw)
        except BaseException as exc:
            stage = run.stage
            for l, p in params.items():
                p.data.copy_(snapshot[l])
            try:
                for l, K in reversed(accumulated):
                    self._solvers[l].accumulate(K, sign=-1)
            except BaseException as undo_exc:
                self._broken = (f"the sequential solver state could not be rolled back after a failed batch "
                                f"({type(undo_exc).__name__}: {undo_exc}); call restore() to start over")
            which = _describe(batch, start)
            detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            index = start if len(batch) == 1 else None
            if isinstance(exc, EditError) and exc.request_index is not None and exc.request_index < len(run.kept):
                # the stage numbered the request within the (kept) requests it was given
                index = start + run.kept[exc.request_index]
            error = EditError(f"edit failed at stage {stage!r} on {which}; the weights were restored: {detail}",
                              request_index=index, stage=stage)
            if not isinstance(exc, Exception):  # KeyboardInterrupt, SystemExit: rolled back, then itself
                exc.edit_error = error
                raise
            raise error from exc
        if call is not None:
            call.accumulated.extend(accumulated)
        self.batches_done += 1
        deltas = None
        if self.record_deltas:
            acc = torch.promote_types(self.adapter.dtype, torch.float32)
            deltas = {l: self._dk(params[l].detach()).to(acc) - self._dk(snapshot[l]).to(acc) for l in written}
        return BatchReport(index=self.batches_done - 1, requests=list(range(start, stop)),
                           case_ids=[r.case_id for r in batch], edited=[start + i for i in sorted(run.written)],
                           dropped=[{**d, "request": start + d["request"]} for d in run.dropped],
                           vstar={l: {**v, "requests": [start + i for i in v["requests"]]} for l, v in run.vstar.items()},
                           layers=run.layers, times=run.times, seconds=time.perf_counter() - t0, deltas=deltas)

    def _prune(self) -> dict:
        """W ← W0 + F(ΔW_total) on every edited layer (PRUNE); the caller's transaction
        (:class:`_CallUndo`) restores the weights if it fails."""
        out = {}
        try:
            for l in self._raw_delta:
                w0 = self._dk(self._originals[l])
                restrained, info = prune_restrain(self._raw_delta[l], w0)
                W = self.adapter.weight(l)
                W.copy_((w0.to(torch.float64) + restrained).to(W.dtype))
                out[l] = info
        except Exception as exc:
            raise EditError(f"PRUNE failed: {type(exc).__name__}: {exc}", stage="prune") from exc
        return out

    def _dk(self, stored: torch.Tensor) -> torch.Tensor:
        """A stored rewrite weight (or a copy of one) as (d, d_k)."""
        return stored.T if self.adapter.transposed else stored

    # ---------------------------------------------------------------- state
    def weight_norms(self) -> dict:
        """{layer: {"original": ‖W0‖_F, "current": ‖W‖_F, "growth": ratio}} of the edited layers."""
        out = {}
        for l in self.edit_layers:
            w0 = float(self._originals[l].to(torch.float64).norm())
            w = float(self.adapter.weight(l).to(torch.float64).norm())
            out[l] = {"original": w0, "current": w, "growth": w / w0 if w0 > 0 else None}
        return out

    @property
    def original_weights(self) -> dict:
        """{layer: the rewrite weight before any edit}, in the parameter's own layout and dtype
        (GPT-2's Conv1D: (d_k, d)); the references' ``weights_copy``. Do not modify them:
        :meth:`restore` writes them back."""
        return dict(self._originals)

    def delta(self, layer: int) -> torch.Tensor:
        """W − W0 of an edited layer as (d, d_k), float32 or wider: the sum of every update so far."""
        if layer not in self._originals:
            raise InputError(f"layer {layer} is not edited by this Editor (it edits {list(self.edit_layers)})")
        acc = torch.promote_types(self.adapter.dtype, torch.float32)
        return self.adapter.weight(layer).to(acc) - self._dk(self._originals[layer]).to(acc)

    @property
    def anchors(self) -> dict:
        """NAS anchors μ by layer (empty until the first NAS edit)."""
        return dict(self._anchors)

    def restore(self) -> None:
        """Write the original weights back and forget the sequential state (accumulated keys)."""
        for l, w in self._originals.items():
            self.adapter.weight_param(l).data.copy_(w)
        self._solvers.clear()
        self._raw_delta.clear()
        self._broken = None
        self.batches_done = 0


class _CallUndo:
    """What one ``edit()`` call changed, to undo all of it (PRUNE's one transaction): the edited
    weights, PRUNE's running total and batch count as they were, and the keys each batch added
    to the sequential solver state."""

    def __init__(self, editor: "Editor"):
        self.editor = editor
        self.weights = {l: editor.adapter.weight_param(l).detach().clone() for l in editor.edit_layers}
        self.raw_delta = dict(editor._raw_delta)
        self.batches_done = editor.batches_done
        self.accumulated: list = []

    def undo(self) -> bool:
        ed = self.editor
        for l, w in self.weights.items():
            ed.adapter.weight_param(l).data.copy_(w)
        ed._raw_delta = self.raw_delta
        ed.batches_done = self.batches_done
        try:
            for l, K in reversed(self.accumulated):
                ed._solvers[l].accumulate(K, sign=-1)
        except BaseException as undo_exc:
            ed._broken = (f"the sequential solver state could not be rolled back after a failed edit() call "
                          f"({type(undo_exc).__name__}: {undo_exc}); call restore() to start over")
        return True


def _describe(batch: list, start: int) -> str:
    ids = [r.case_id for r in batch if r.case_id is not None]
    where = f"request {start}" if len(batch) == 1 else f"requests {start}-{start + len(batch) - 1}"
    if ids:
        shown = ", ".join(str(c) for c in ids[:5]) + (", ..." if len(ids) > 5 else "")
        where += f" (case_id {shown})"
    return where


def _progress(total: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, unit="edit", desc=desc)

