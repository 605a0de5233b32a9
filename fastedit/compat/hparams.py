"""The reference repositories' hyper-parameter files as fastedit parameters.

Reads the JSON files of kmeng01/memit and jianghoucheng/AlphaEdit (``hparams/MEMIT/*.json``,
``hparams/AlphaEdit/*.json``) and EasyEdit's YAML files (``hparams/MEMIT/*.yaml``,
``hparams/AlphaEdit/*.yaml``). Every key is accounted for; each is one of:

- mapped to an :class:`~fastedit.editing.EditParams` field (``layers``, ``v_*``,
  ``clamp_norm_factor``, ``kl_factor``, ``mom2_update_weight`` → ``lam``,
  ``nullspace_threshold``, ``L2``, ``context_template_length_params`` → ``context_length`` /
  ``context_n``; fastedit's own field names are accepted too);
- a fixed behaviour of fastedit that the file must agree with (``fact_token`` =
  ``subject_last``, ``layer_selection`` = ``all``, ``mom2_adjustment`` = true): any other value
  is refused, since fastedit would silently do something else;
- checked against the model when it is known (:meth:`ReferenceConfig.check_model`): the module
  templates (``rewrite_module_tmp`` must be the module fastedit edits, the others must exist) and
  ``v_loss_layer`` (the loss is read at the model's last layer);
- the statistics request (``mom2_dataset``, ``mom2_n_samples``, ``mom2_dtype``, ``stats_dir``),
  kept in :attr:`ReferenceConfig.stats` to find or collect C0;
- bookkeeping that does not change an edit (``model_name``, ``alg_name``, ``device``,
  ``model_parallel``, ``batch_size``), kept in :attr:`ReferenceConfig.info`; ``P_loc`` (where
  AlphaEdit caches its dense projector) is kept there with a warning, as fastedit computes and
  caches its own null-space basis and never reads that file.

An unknown key is an :class:`~fastedit.errors.InputError` naming it (``strict=False``: a warning
naming it, and the key is listed in :attr:`ReferenceConfig.unknown`).

The algorithm comes from ``alg_name`` (the file's key in EasyEdit, the ``--alg_name`` argument of
the reference scripts, or the name of the file's folder, ``hparams/<alg_name>/...``): ``MEMIT``,
``MEMIT_seq``, ``AlphaEdit`` with the modifiers ``BLUE``, ``NAS``, ``RECT``, ``PRUNE`` joined by
``_`` or ``-`` in any order, e.g. ``AlphaEdit_BLUE``, ``MEMIT_rect``, ``NAS_MEMIT``.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import re
import warnings
from dataclasses import dataclass, field

from fastedit.editing.hparams import EditParams
from fastedit.errors import InputError

#: reference key -> EditParams field
PARAM_KEYS = {"layers": "layers", "v_num_grad_steps": "v_num_grad_steps", "v_lr": "v_lr",
              "clamp_norm_factor": "clamp_norm_factor", "kl_factor": "kl_factor",
              "v_weight_decay": "v_weight_decay", "mom2_update_weight": "lam",
              "nullspace_threshold": "nullspace_threshold", "L2": "L2"}
#: keys whose value names a behaviour fastedit has exactly one of
FIXED_KEYS = {"fact_token": "subject_last", "layer_selection": "all", "mom2_adjustment": True}
#: module-name templates, checked against the model
MODULE_KEYS = ("rewrite_module_tmp", "layer_module_tmp", "mlp_module_tmp", "attn_module_tmp", "ln_f_module",
               "lm_head_module")
STATS_KEYS = ("mom2_dataset", "mom2_n_samples", "mom2_dtype", "stats_dir")
INFO_KEYS = ("model_name", "alg_name", "device", "model_parallel", "batch_size", "P_loc")
_INT_FIELDS = {"v_num_grad_steps", "nas_sample_size", "nas_seed", "context_n", "context_length", "max_chunk_tokens"}
_TUPLE_FIELDS = {"layers", "blue_layers"}

_BASES = {"memit": "memit", "alphaedit": "alphaedit"}
_MODIFIERS = ("blue", "nas", "rect", "prune", "seq")


@dataclass(frozen=True)
class ReferenceConfig:
    """A reference hyper-parameter file, translated.

    Attributes:
        params: the :class:`EditParams`.
        method, strategy, nas, regularizer: the Editor's arguments for ``alg_name``.
        alg_name: the algorithm name the method was read from.
        modules: the module-name templates of the file (``rewrite_module_tmp`` etc.).
        v_loss_layer: the layer the file reads the v* loss at (None if absent).
        stats: ``{"dataset", "n_samples", "dtype", "stats_dir"}`` of the C0 statistics.
        info: keys kept for the record that do not change an edit.
        unknown: keys not understood (only with ``strict=False``).
        source: the file read, if any.
    """

    params: EditParams
    method: str
    strategy: str = "distribute"
    nas: bool = False
    regularizer: str | None = None
    alg_name: str | None = None
    modules: dict = field(default_factory=dict)
    v_loss_layer: int | None = None
    stats: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    unknown: dict = field(default_factory=dict)
    source: str | None = None

    def editor_kwargs(self) -> dict:
        """Keyword arguments of :class:`fastedit.Editor` (without model, tokenizer and stats)."""
        return {"method": self.method, "strategy": self.strategy, "nas": self.nas,
                "regularizer": self.regularizer, "hparams": self.params}

    def check_model(self, model) -> None:
        """Refuse a model the file does not describe: ``rewrite_module_tmp`` must name the module
        fastedit edits at every layer, the other templates must exist, ``v_loss_layer`` must be the
        last layer (fastedit reads the loss at the model's output, as the references do with it)."""
        from fastedit.models import get_adapter

        adapter = get_adapter(model)
        names = dict(model.named_modules())
        rewrite = self.modules.get("rewrite_module_tmp")
        for layer in (*self.params.layers, *self.params.boundary_layers):
            if rewrite is not None and rewrite.format(layer) != adapter.rewrite_name(layer):
                raise InputError(f"{self._where()}: rewrite_module_tmp {rewrite!r} names {rewrite.format(layer)!r}, but "
                                 f"fastedit edits {adapter.rewrite_name(layer)!r} in this model; the file is for "
                                 "another architecture")
            for key in ("layer_module_tmp", "mlp_module_tmp", "attn_module_tmp"):
                tmpl = self.modules.get(key)
                if tmpl is not None and tmpl.format(layer) not in names:
                    raise InputError(f"{self._where()}: {key} {tmpl!r}: the model has no module {tmpl.format(layer)!r}")
        for key in ("ln_f_module", "lm_head_module"):
            name = self.modules.get(key)
            if name is not None and name not in names:
                raise InputError(f"{self._where()}: {key}: the model has no module {name!r}")
        if self.v_loss_layer is not None and self.v_loss_layer != adapter.num_layers - 1:
            raise InputError(f"{self._where()}: v_loss_layer is {self.v_loss_layer}, but this model's last layer is "
                             f"{adapter.num_layers - 1}; fastedit reads the v* loss at the model's output (the last "
                             "layer), so the file is for another model")

    def _where(self) -> str:
        return self.source or "hyper-parameters"


def _parse_alg(alg: str, where: str) -> dict:
    tokens = [t for t in re.split(r"[_\-\s]+", str(alg).strip().lower()) if t]
    bases = [t for t in tokens if t in _BASES]
    rest = [t for t in tokens if t not in _BASES]
    bad = [t for t in rest if t not in _MODIFIERS]
    if len(bases) != 1 or bad:
        raise InputError(f"{where}: alg_name {alg!r} is not one fastedit runs; it runs MEMIT, MEMIT_seq and "
                         "AlphaEdit, with the modifiers BLUE, NAS, RECT, PRUNE (e.g. 'AlphaEdit_BLUE', 'MEMIT_rect')")
    if "rect" in rest and "prune" in rest:
        raise InputError(f"{where}: alg_name {alg!r} asks for both RECT and PRUNE; choose one")
    method = bases[0]
    if "seq" in rest:
        if method != "memit":
            raise InputError(f"{where}: alg_name {alg!r}: only MEMIT has a _seq variant")
        method = "memit_seq"
    reg = "rect" if "rect" in rest else "prune" if "prune" in rest else None
    return {"method": method, "strategy": "blue" if "blue" in rest else "distribute", "nas": "nas" in rest,
            "regularizer": reg}


#: fastedit's own fields that are no numbers (a file may set them like any EditParams field).
_CHECKED_BY_EDITPARAMS = ("vstar_checkpoint", "vstar_autocast")
#: Fields whose None means "not set" (the default).
_OPTIONAL_FIELDS = ("blue_layers", "max_chunk_tokens")


def _number(key: str, value, fieldname: str, where: str):
    # PyYAML reads YAML 1.1, where "1e-1" (no dot) is a string: EasyEdit's files are full of them.
    if fieldname in _TUPLE_FIELDS:
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise InputError(f"{where}: {key} must be a list of layer indices, got {value!r}")
        return tuple(value)
    try:
        if isinstance(value, bool):
            raise ValueError
        num = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{where}: {key} must be a number, got {value!r}") from None
    if fieldname in _INT_FIELDS:
        if num != int(num):
            raise InputError(f"{where}: {key} must be an integer, got {value!r}")
        return int(num)
    return num


def read_file(path) -> dict:
    """The key/value mapping of a reference ``.json`` or EasyEdit ``.yaml``/``.yml`` file."""
    p = pathlib.Path(path)
    if not p.is_file():
        raise InputError(f"hyper-parameter file {str(p)!r} does not exist")
    text = p.read_text(encoding="utf-8")
    if p.suffix.lower() in (".yaml", ".yml"):
        import yaml  # a dependency of transformers

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise InputError(f"{p} is not valid YAML: {exc}") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"{p} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InputError(f"{p}: expected a mapping of hyper-parameters, got {type(data).__name__}")
    return data


def load_hparams(source, *, alg_name: str | None = None, strict: bool = True, **overrides) -> ReferenceConfig:
    """Translate a reference hyper-parameter file (path, or an already loaded dict) into a
    :class:`ReferenceConfig` (see the module docstring for how each key is handled).

    ``alg_name`` overrides the file's ``alg_name`` (and the folder name). ``overrides`` are
    EditParams fields set after the file, e.g. ``L2=80.0``.
    """
    if isinstance(source, dict):
        data, where, path = dict(source), "hyper-parameters", None
    else:
        path = pathlib.Path(source)
        data, where = read_file(path), str(path)
    alg = alg_name or data.get("alg_name") or (path.parent.name if path is not None else None)
    if not alg:
        raise InputError(f"{where}: no alg_name in the file; pass alg_name='MEMIT' or 'AlphaEdit' (with _BLUE, "
                         "_NAS, _RECT, _PRUNE as wanted)")
    try:
        variant = _parse_alg(alg, where)
    except InputError:
        if alg_name or data.get("alg_name"):
            raise
        raise InputError(f"{where}: no alg_name in the file, and the folder name {alg!r} is not an algorithm "
                         "fastedit runs; pass alg_name='MEMIT' or 'AlphaEdit' (with _BLUE, _NAS, _RECT, _PRUNE "
                         "as wanted)") from None
    own = {f.name for f in dataclasses.fields(EditParams)} - {"extra"}
    fields: dict = {}
    modules: dict = {}
    stats: dict = {}
    info: dict = {}
    unknown: dict = {}
    v_loss_layer = None
    for key, value in data.items():
        if key in PARAM_KEYS or key in own:
            name = PARAM_KEYS.get(key, key)
            if name in _CHECKED_BY_EDITPARAMS or (value is None and name in _OPTIONAL_FIELDS):
                fields[name] = value  # not a number: EditParams checks it
            else:
                fields[name] = _number(key, value, name, where)
        elif key in FIXED_KEYS:
            want = FIXED_KEYS[key]
            if value != want:
                raise InputError(f"{where}: {key} is {value!r}; fastedit implements only {key} = {want!r} "
                                 "(the value of every published MEMIT/AlphaEdit configuration)")
        elif key in MODULE_KEYS:
            if not isinstance(value, str):
                raise InputError(f"{where}: {key} must be a module name (template), got {value!r}")
            modules[key] = value
        elif key in STATS_KEYS:
            stats[key.replace("mom2_", "")] = value
        elif key == "v_loss_layer":
            v_loss_layer = int(_number(key, value, "v_num_grad_steps", where))
        elif key == "context_template_length_params":
            if (not isinstance(value, (list, tuple)) or len(value) != 1 or not isinstance(value[0], (list, tuple))
                    or len(value[0]) != 2):
                raise InputError(f"{where}: context_template_length_params {value!r}: fastedit generates one group of "
                                 "context templates, give one [length, count] pair, e.g. [[10, 5]]")
            fields["context_length"] = _number(key, value[0][0], "context_length", where)
            fields["context_n"] = _number(key, value[0][1], "context_n", where)
        elif key in INFO_KEYS:
            info[key] = value
        else:
            unknown[key] = value
    if unknown:
        names = ", ".join(sorted(unknown))
        msg = (f"{where}: unknown hyper-parameter key(s) {names}; fastedit would not use them. Remove them, or "
               "pass strict=False to load the file anyway (they are then listed in .unknown)")
        if strict:
            raise InputError(msg)
        warnings.warn(msg, stacklevel=2)
    if "P_loc" in info:
        warnings.warn(f"{where}: P_loc {info['P_loc']!r} is not read: fastedit computes the null-space basis from "
                      "C0 itself (and caches it in memory for the run)", stacklevel=2)
    fields.update(overrides)
    if "layers" not in fields:
        raise InputError(f"{where}: no 'layers' key: the critical layers to edit are required")
    try:
        params = EditParams(**fields)
    except TypeError as exc:
        raise InputError(f"{where}: {exc}") from None
    return ReferenceConfig(params=params, alg_name=alg, modules=modules, v_loss_layer=v_loss_layer, stats=stats,
                           info=info, unknown=unknown, source=None if path is None else str(path), **variant)
