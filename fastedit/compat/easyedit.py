"""EasyEdit's editing entry points for its MEMIT and AlphaEdit methods, run by fastedit.

A script written against EasyEdit switches by changing its import::

    from fastedit.compat.easyedit import BaseEditor, MEMITHyperParams   # was: from easyeditor import ...
    hparams = MEMITHyperParams.from_hparams("hparams/MEMIT/llama3-8b.yaml")
    editor = BaseEditor.from_hparams(hparams)
    metrics, edited_model, _ = editor.edit(prompts=..., ground_truth=..., target_new=..., subject=...,
                                           rephrase_prompts=..., locality_inputs=..., sequential_edit=True)

As in EasyEdit, ``sequential_edit=False`` edits and evaluates each request on its own and
restores the weights after it; ``sequential_edit=True`` applies every request in turn (one
edit at a time) and evaluates them all at the end; :meth:`BaseEditor.batch_edit` applies
``batch_size`` requests per update. Metrics per request: ``{"case_id", "requested_rewrite",
"time", "pre": {...}, "post": {"rewrite_acc": [a], "rephrase_acc": [a], "locality":
{"<key>_acc": [a]}}}``, with a the teacher-forced token accuracy in [0, 1] (fastedit's zsRE
scoring). One difference, stated: EasyEdit's locality compares post-edit with pre-edit
predictions, here it is the token accuracy of the locality ``ground_truth`` (compare ``pre`` and
``post`` for the change).
"""
from __future__ import annotations

import time

from fastedit.compat.hparams import ReferenceConfig, load_hparams
from fastedit.compat.reference import _stats_source
from fastedit.compat.requests import easyedit_records
from fastedit.errors import InputError


class _HyperParams:
    alg_name = ""

    @classmethod
    def from_hparams(cls, path, **kwargs) -> ReferenceConfig:
        """The YAML file as a :class:`ReferenceConfig` (its ``alg_name`` key decides the variant;
        ``cls.alg_name`` when it has none)."""
        cfg = load_hparams(path, **kwargs)
        if cfg.method.split("_")[0] != cls.alg_name.lower():
            raise InputError(f"{path} is a {cfg.alg_name} file, not {cls.alg_name}; use the matching HyperParams class")
        return cfg


class MEMITHyperParams(_HyperParams):
    alg_name = "MEMIT"


class AlphaEditHyperParams(_HyperParams):
    alg_name = "AlphaEdit"


class BaseEditor:
    """EasyEdit's ``BaseEditor`` for MEMIT / AlphaEdit (and their BLUE / NAS / RECT / PRUNE
    variants): an :class:`~fastedit.Editor` configured from the hyper-parameters.

    ``model`` / ``tok``: the model to edit; loaded from the file's ``model_name`` with
    transformers when not given. ``stats``: C0 as ``Editor(stats=...)`` takes it; default the
    reference statistics under the file's ``stats_dir``.
    """

    def __init__(self, hparams, model=None, tok=None, stats=None):
        if not isinstance(hparams, ReferenceConfig):
            hparams = load_hparams(hparams)
        if model is None or tok is None:
            name = hparams.info.get("model_name")
            if not name:
                raise InputError("no model: pass model= and tok=, or give model_name in the hyper-parameters")
            from transformers import AutoModelForCausalLM, AutoTokenizer

            model = model if model is not None else AutoModelForCausalLM.from_pretrained(name)
            tok = tok if tok is not None else AutoTokenizer.from_pretrained(name)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        hparams.check_model(model)
        self.hparams, self.model, self.tok = hparams, model, tok
        self._stats = _stats_source(hparams, stats)
        self._editor = None

    @classmethod
    def from_hparams(cls, hparams, **kwargs) -> "BaseEditor":
        return cls(hparams, **kwargs)

    @property
    def editor(self):
        """The :class:`~fastedit.Editor` doing the edits (created on first use)."""
        if self._editor is None:
            from fastedit.editing import Editor

            self._editor = Editor(self.model, self.tok, stats=self._stats, progress=False,
                                  **self.hparams.editor_kwargs())
        return self._editor

    def _scores(self, records) -> list:
        from fastedit.eval.scoring import target_scores

        items = []  # (record index, metric key, locality key, prompt, target)
        for i, rec in enumerate(records):
            rr = rec["requested_rewrite"]
            new = rr["target_new"]["str"]
            items.append((i, "rewrite_acc", None, rr["prompt"].replace("{}", rr["subject"]), new))
            items += [(i, "rephrase_acc", None, p, new) for p in rec["paraphrase_prompts"]]
            items += [(i, "locality", f"{n['locality']}_acc", n["prompt"], n["target"])
                      for n in rec["neighborhood_prompts"]]
        _, acc = target_scores(self.model, self.tok, [x[3] for x in items], [x[4] for x in items])
        out = [{"rewrite_acc": [], "rephrase_acc": [], "locality": {}} for _ in records]
        for (i, key, loc, _, _), a in zip(items, acc.tolist()):
            if loc is None:
                out[i][key].append(a)
            else:
                out[i]["locality"].setdefault(loc, []).append(a)
        return out

    def edit(self, prompts, target_new, ground_truth=None, subject=None, rephrase_prompts=None,
             locality_inputs=None, portability_inputs=None, sequential_edit: bool = False,
             keep_original_weight: bool = False, verbose: bool = True, **kwargs):
        """EasyEdit's ``edit``: returns ``(metrics, edited_model, weights_copy)``.

        ``weights_copy`` is ``{"<rewrite module>.weight": weight before this call}``.
        ``keep_original_weight`` and ``verbose`` are accepted and change nothing here; any other
        keyword raises.
        """
        return self._edit(prompts, target_new, ground_truth, subject, rephrase_prompts, locality_inputs,
                          portability_inputs, batch_size=1, sequential=sequential_edit, extra=kwargs)

    def batch_edit(self, prompts, target_new, ground_truth=None, subject=None, rephrase_prompts=None,
                   locality_inputs=None, portability_inputs=None, sequential_edit: bool = False,
                   keep_original_weight: bool = False, verbose: bool = True, **kwargs):
        """EasyEdit's ``batch_edit``: ``batch_size`` (the file's) requests per update, applied
        in sequence; evaluated at the end. Returns ``(metrics, edited_model, weights_copy)``."""
        size = self.hparams.info.get("batch_size")
        if not isinstance(size, int) or size < 1:
            raise InputError("batch_edit needs batch_size in the hyper-parameters (a positive integer)")
        return self._edit(prompts, target_new, ground_truth, subject, rephrase_prompts, locality_inputs,
                          portability_inputs, batch_size=size, sequential=True, extra=kwargs)

    def _edit(self, prompts, target_new, ground_truth, subject, rephrase_prompts, locality_inputs,
              portability_inputs, *, batch_size: int, sequential: bool, extra: dict):
        from fastedit.editing import requests_from_records

        if extra:
            raise InputError(f"edit: argument(s) fastedit does not take: {', '.join(sorted(extra))}")
        records = easyedit_records(prompts, target_new, subject, ground_truth, rephrase_prompts, locality_inputs,
                                   portability_inputs)
        requests = requests_from_records(records)
        editor = self.editor
        weights_copy = {f"{editor.adapter.rewrite_name(l)}.weight": editor.adapter.weight_param(l).detach().clone()
                        for l in editor.edit_layers}
        pre = self._scores(records)
        metrics = []
        if sequential:
            t0 = time.perf_counter()
            editor.edit(requests, batch_size=batch_size)
            elapsed = time.perf_counter() - t0
            post = self._scores(records)
            times = [elapsed / len(records)] * len(records)
        else:
            post, times = [], []
            for rec, req in zip(records, requests):
                t0 = time.perf_counter()
                editor.edit([req], batch_size=1)
                times.append(time.perf_counter() - t0)
                post.extend(self._scores([rec]))
                editor.restore()
        for i, rec in enumerate(records):
            metrics.append({"case_id": i, "requested_rewrite": rec["requested_rewrite"], "time": times[i],
                            "pre": pre[i], "post": post[i]})
        return metrics, self.model, weights_copy
