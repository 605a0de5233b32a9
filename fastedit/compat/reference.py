"""The MEMIT / AlphaEdit research code's entry points, run by fastedit's Editor.

A driver script written against the reference code switches by changing its import::

    from fastedit.compat import apply_memit_to_model          # was: from memit import apply_memit_to_model
    from fastedit.compat import apply_AlphaEdit_to_model      # was: from AlphaEdit import apply_AlphaEdit_to_model

``hparams`` is a reference JSON / EasyEdit YAML path, its dict, the reference's hyper-parameter
object (any object whose attributes are the file's keys) or a
:class:`~fastedit.compat.ReferenceConfig`. ``requests`` are the reference's dicts
(``{"prompt": "{} plays", "subject": ..., "target_new": {"str": ...}}``) or EasyEdit's (the
subject written inside the prompt). C0 comes from ``stats=`` (anything ``Editor(stats=...)``
takes) or else from the reference statistics under the file's ``stats_dir`` (default
``data/stats``, the reference's ``STATS_DIR``), read exactly as the reference reads them.

What the references keep in module globals (the generated context templates, the covariance,
AlphaEdit's P and cache_c) lives in an :class:`~fastedit.Editor` per model and configuration,
reused across calls, so calls in sequence behave as in the reference: MEMIT solves each call
against λC0 alone, AlphaEdit accumulates C_p across calls.
"""
from __future__ import annotations

import copy as _copy
import dataclasses
import pathlib
import warnings
import weakref

import torch

from fastedit.compat.hparams import ReferenceConfig, load_hparams
from fastedit.compat.requests import to_request
from fastedit.stats.reference import ReferenceStats
from fastedit.errors import InputError

#: model -> [(config, stats, Editor)]: the state the references keep in module globals.
_SESSIONS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
DEFAULT_STATS_DIR = "data/stats"
#: tells "cache_c=None passed" (AlphaEdit's repository's first call) from "not passed" (EasyEdit)
_UNSET = object()


def as_config(hparams, alg_name: str | None = None) -> ReferenceConfig:
    """A :class:`ReferenceConfig` from a path, a dict, a reference hyper-parameter object or a config."""
    if isinstance(hparams, ReferenceConfig):
        return hparams
    if isinstance(hparams, (str, pathlib.Path, dict)):
        return load_hparams(hparams, alg_name=alg_name if isinstance(hparams, dict) or alg_name else None)
    if dataclasses.is_dataclass(hparams):
        data = dataclasses.asdict(hparams)
    elif hasattr(hparams, "__dict__"):
        data = {k: v for k, v in vars(hparams).items() if not k.startswith("_")}
    else:
        raise InputError(f"hparams must be a hyper-parameter file, its dict or object, or a ReferenceConfig; "
                         f"got {type(hparams).__name__}")
    return load_hparams(data, alg_name=alg_name or data.get("alg_name"))


def _stats_source(config: ReferenceConfig, stats):
    if stats is not None:
        return stats
    directory = config.stats.get("stats_dir") or DEFAULT_STATS_DIR
    if not pathlib.Path(directory).is_dir():
        raise InputError(f"no statistics: pass stats= (a {{layer: C0}} dict, a fastedit statistics directory or "
                         f"the reference's .npz directory), or put the reference statistics under {directory!r} "
                         "(the hyper-parameters' stats_dir, default data/stats)")
    return ReferenceStats.from_config(config, directory)


def _editor(model, tok, config: ReferenceConfig, stats, method: str | None = None):
    from fastedit.editing import Editor

    for cfg, src, ed in _SESSIONS.get(model, []):
        same_stats = src is stats or (isinstance(src, ReferenceStats) and src == stats)
        if cfg == config and same_stats and (method is None or ed.method == method):
            return ed
    config.check_model(model)
    kwargs = config.editor_kwargs()
    if method is not None:
        kwargs["method"] = method
    ed = Editor(model, tok, stats=stats, progress=False, **kwargs)
    _SESSIONS.setdefault(model, []).append((config, stats, ed))
    return ed


def _weights_copy(editor) -> dict:
    return {f"{editor.adapter.rewrite_name(l)}.weight": editor.adapter.weight_param(l).detach().clone()
            for l in editor.edit_layers}


def _cache_template_note(cache_template) -> None:
    if cache_template is not None:
        warnings.warn("cache_template is not used: fastedit does not cache per-request target vectors on disk "
                      "(it computes them batched); the edit is the same", stacklevel=3)


def _run(model, tok, requests, hparams, *, copy: bool, return_orig_weights: bool, cache_template, stats, alg_name,
         method=None, batch_size=None):
    config = as_config(hparams, alg_name)
    if method is None and config.method == "alphaedit":
        raise InputError(f"hparams are for {config.alg_name!r}: call apply_AlphaEdit_to_model")
    if copy:
        model = _copy.deepcopy(model)
    _cache_template_note(cache_template)
    reqs = [to_request(r, index=i) for i, r in enumerate(requests)]
    editor = _editor(model, tok, config, _stats_source(config, stats), method)
    weights_copy = _weights_copy(editor) if return_orig_weights else {}
    editor.edit(reqs, batch_size=batch_size or len(reqs))
    return model, weights_copy, editor


def apply_memit_to_model(model, tok, requests, hparams, copy: bool = False, return_orig_weights: bool = False,
                         cache_template=None, *, stats=None, alg_name: str = "MEMIT"):
    """The reference ``apply_memit_to_model``: all ``requests`` as one batch of MEMIT.

    Returns ``(model, weights_copy)``: the edited model (a deep copy when ``copy``) and, when
    ``return_orig_weights``, ``{"<rewrite module>.weight": weight before this call}`` (else {}).
    ΔW = R Kᵀ(λC0 + KKᵀ)⁻¹ per layer as in :mod:`fastedit.editing.methods`. ``alg_name`` picks a
    variant (``"MEMIT_BLUE"``, ``"MEMIT_rect"``, ...) for files that name none.
    """
    model, weights_copy, _ = _run(model, tok, requests, hparams, copy=copy, return_orig_weights=return_orig_weights,
                                  cache_template=cache_template, stats=stats, alg_name=alg_name)
    return model, weights_copy


class AlphaEditState:
    """What the reference passes around as ``P`` and ``cache_c``: the null-space basis Q of each
    edited layer and C_p (the keys of earlier calls), kept reduced as Qᵀ C_p Q by the Editor.

    ``editor`` is the :class:`~fastedit.Editor` holding it; ``calls`` counts the edits so far."""

    def __init__(self, editor):
        self.editor = editor
        self.calls = 0

    def __repr__(self) -> str:
        ranks = {l: s.impl.rank for l, s in self.editor._solvers.items()}
        return f"AlphaEditState(layers={list(self.editor.edit_layers)}, null-space ranks={ranks}, calls={self.calls})"


def _seed_from_dense(editor, P, cache_c) -> None:
    """Solvers from the reference's dense P (L, d_k, d_k) and cache_c (L, d_k, d_k): Q = the
    eigenvectors of P with eigenvalue 1 (P = QQᵀ is a projector), C_p = cache_c."""
    from fastedit.editing.methods import AlphaEditSolver
    from fastedit.linalg import NullSpace

    layers = editor.edit_layers
    for name, t in (("P", P), ("cache_c", cache_c)):
        if t is not None and (not torch.is_tensor(t) or t.dim() != 3 or t.shape[0] != len(layers)):
            raise InputError(f"{name} must be the reference's ({len(layers)}, d_k, d_k) tensor (one matrix per edited "
                             f"layer {list(layers)}) or the state returned by the previous call")
    dev = editor.adapter.device
    for i, l in enumerate(layers):
        if P is not None:
            vals, vecs = torch.linalg.eigh(P[i].to(dev, torch.float64))
            if not bool(((vals - 1).abs() < 1e-3).logical_or(vals.abs() < 1e-3).all()):
                raise InputError(f"P[{i}] (layer {l}) is not a projector (eigenvalues other than 0 and 1)")
            Q = vecs[:, vals > 0.5].contiguous()
            solver = AlphaEditSolver.__new__(AlphaEditSolver)
            solver.impl = NullSpace(Q, vals, editor.hparams.nullspace_threshold, layer=l)
            solver.alpha, solver.layer = float(editor.hparams.L2), l
            editor._solvers[l] = solver
        if cache_c is not None and bool(cache_c[i].any()):
            C = cache_c[i].to(dev, torch.float64)
            s, V = torch.linalg.eigh((C + C.mT) / 2)
            keep = s > 0
            if l not in editor._solvers:
                editor._solvers[l] = _alphaedit_solver(editor, l)
            editor._solvers[l].accumulate(V[:, keep] * s[keep].sqrt())


def _alphaedit_solver(editor, layer):
    from fastedit.editing.methods import make_solver

    return make_solver("alphaedit", editor.covariance(layer), editor.hparams, layer)


def apply_AlphaEdit_to_model(model, tok, requests, hparams, copy: bool = False, return_orig_weights: bool = False,
                             cache_template=None, cache_c=_UNSET, P=_UNSET, *, stats=None, alg_name: str = "AlphaEdit",
                             **kwargs):
    """The reference ``apply_AlphaEdit_to_model``, in both published call shapes.

    - AlphaEdit's repository: ``model, cache_c = apply_AlphaEdit_to_model(model, tok, requests,
      hparams, cache_c=cache_c, P=P)``, recognised by ``cache_c`` or ``P`` being passed at all. On
      the first call pass ``cache_c=None, P=None`` (fastedit
      computes the null space from the statistics), or the reference's dense tensors: P
      (L, d_k, d_k) projectors (their range is used) and cache_c (L, d_k, d_k). The returned
      ``cache_c`` is an :class:`AlphaEditState`; pass it back as ``cache_c`` (and/or ``P``) to
      continue the sequence (C_p += KKᵀ of each call). Once a state is passed, the projector is
      the state's: a dense P given again (the reference's driver passes the same P every call)
      is not read.
    - EasyEdit's: ``model, weights_copy = apply_AlphaEdit_to_model(model, tok, requests, hparams,
      copy=..., return_orig_weights=...)``, the state kept per model between calls (as EasyEdit's
      globals).

    ΔWᵀ = Q(Qᵀ(C_p + KKᵀ)Q + αI)⁻¹QᵀKRᵀ, α = L2. Keyword arguments EasyEdit passes and that do
    not change the edit (``keep_original_weight``, ``train_ds``) are accepted; any other raises.
    """
    unknown = set(kwargs) - {"keep_original_weight", "train_ds"}
    if unknown:
        raise InputError(f"apply_AlphaEdit_to_model: unknown argument(s) {', '.join(sorted(unknown))}")
    state = cache_c if isinstance(cache_c, AlphaEditState) else P if isinstance(P, AlphaEditState) else None
    repo_form = cache_c is not _UNSET or P is not _UNSET
    cache_c, P = (None if x is _UNSET else x for x in (cache_c, P))
    if state is not None:
        if copy:
            raise InputError("copy=True cannot continue a sequence: the state belongs to the model it edited")
        _cache_template_note(cache_template)
        editor = state.editor
        if editor.model is not model:
            raise InputError("the cache_c / P state was made for another model; start with cache_c=None, P=None")
        reqs = [to_request(r, index=i) for i, r in enumerate(requests)]
        weights_copy = _weights_copy(editor) if return_orig_weights else {}
        editor.edit(reqs, batch_size=len(reqs))
    elif repo_form:
        config = as_config(hparams, alg_name)
        if copy:
            model = _copy.deepcopy(model)
        from fastedit.editing import Editor

        config.check_model(model)
        _cache_template_note(cache_template)
        editor = Editor(model, tok, stats=_stats_source(config, stats), progress=False, **config.editor_kwargs())
        if editor.method != "alphaedit":
            raise InputError(f"hparams are for {config.alg_name!r}, not AlphaEdit")
        _seed_from_dense(editor, P, cache_c)
        state = AlphaEditState(editor)
        reqs = [to_request(r, index=i) for i, r in enumerate(requests)]
        weights_copy = _weights_copy(editor) if return_orig_weights else {}
        editor.edit(reqs, batch_size=len(reqs))
    else:
        model, weights_copy, editor = _run(model, tok, requests, hparams, copy=copy,
                                           return_orig_weights=return_orig_weights, cache_template=cache_template,
                                           stats=stats, alg_name=alg_name, method="alphaedit")
        return model, weights_copy
    state.calls += 1
    return model, state
