"""NAS, norm-anchor scaling of the value vectors (ALGORITHMS.md section 7).

Per fact, v* = v0 + δ (v0 the MLP output at the lookup token, δ the optimised offset). The
anchor μ of a (model, layer) is the mean ‖v*‖ over a sample of requests optimised on the
*unedited* model, without its ⌊0.05·m⌋ largest norms. An edit with ‖v*‖ > max_ratio·μ is
dropped; the others get v* ← v*·μ/‖v*‖ and the residual-stream target z = (h_init − v0) + v*.

Where: only at the layer where a strategy writes a fact from scratch, so one anchor per edit
(:func:`fastedit.editing.methods.anchor_layer`): MEMIT's last critical layer for ``distribute``,
the first boundary layer for BLUE. BLUE's last boundary layer optimises v* on the model that
already holds the first layer's update; that v* = v0 + δ is the subject's current MLP output
plus a small correction δ, and scaling it by s = μ/‖v*‖ (≫ 1 against an anchor of full facts)
would make the residual s·δ + (s − 1)·v0, a multiple of v0 that has nothing to do with the fact.
That layer's target stays z = h_init + δ.

The reference draws 1000 CounterFact requests with seed 0 for the anchor. Here the caller
passes the sample (``Editor.edit(..., nas_requests=...)``); without one the Editor uses the
requests of its first batch. At most ``sample_size`` are used, chosen with ``seed``.

Against the reference (ALGORITHMS.md 7, "match or document"):

- Trimming: matched, ⌊0.05·m⌋ largest norms left out (:func:`fastedit.linalg.anchor_from_norms`).
- Anchor prompts: matched, the anchor's v* is optimised on the bare prompt alone (no context
  templates), while the edits' v* use the templates. On the testbed Llama (100 facts, layer 0)
  the bare-prompt anchor is 1.9 % below the templated one (25.79 vs 26.29) and takes a quarter
  of the time.
- A dropped fact: the reference keeps it in the solve with target h_init; fastedit removes it
  from the batch. At the anchor layer h_init − cur = 0, so the reference's row is a zero
  residual, i.e. an extra constraint ΔW·k = 0 for that one subject (and, for AlphaEdit and
  MEMIT_seq, its key in every later batch's system) that fastedit gives no other unedited
  subject; removing it keeps "edited" meaning "a weight was solved for it" and the sequential
  state free of facts that were never written.
"""
from __future__ import annotations

import hashlib
import json
import pathlib
import random
from dataclasses import dataclass

import torch

from fastedit import _io, linalg
from fastedit.errors import InputError

#: The anchor's v* prompts: the edit prompt alone, as the reference (see the module docstring).
BARE_PROMPT = [["{}"]]
ANCHOR_RULE = "bare prompt, floor(0.05 m) largest dropped"


@dataclass(frozen=True)
class AnchoredTargets:
    """The NAS-processed targets of a batch.

    z: (n, d) residual-stream targets (rows of dropped edits keep their unscaled value);
    keep: (n,) bool, False for dropped edits; v_norm: (n,) ‖v0 + δ‖ before scaling.
    """

    z: torch.Tensor
    keep: torch.Tensor
    v_norm: torch.Tensor


def apply_anchor(h_init: torch.Tensor, v0: torch.Tensor, delta: torch.Tensor, mu: float,
                 max_ratio: float = 2.0) -> AnchoredTargets:
    """z_i = (h_init_i − v0_i) + v*_i·μ/‖v*_i‖ with v*_i = v0_i + δ_i, keep_i = ‖v*_i‖ ≤ max_ratio·μ.

    All of shape (n, d); computed in float64.
    """
    if not mu > 0:
        raise InputError(f"NAS anchor must be > 0, got {mu!r}")
    h, v0_, dl = (t.to(torch.float64) for t in (h_init, v0, delta))
    v = v0_ + dl
    scaled, keep = linalg.norm_anchor(v, mu, max_ratio)
    return AnchoredTargets(z=(h - v0_) + scaled, keep=keep.to(torch.bool), v_norm=v.norm(dim=-1))


def choose_sample(requests: list, size: int, seed: int = 0) -> list:
    """At most ``size`` of ``requests``: all of them when few enough, else a seeded random draw."""
    if len(requests) <= size:
        return list(requests)
    idx = sorted(random.Random(seed).sample(range(len(requests)), size))
    return [requests[i] for i in idx]


def estimate_anchor(model, tok, adapter, requests: list, layer: int, *, hparams,
                    batch_size: int = 100, progress: bool = False) -> tuple[float, dict]:
    """μ = trimmed mean of ‖v0 + δ‖ over ``requests``, v* optimised at ``layer`` on the model as is,
    on the bare prompt (the reference's anchor: no context templates).

    Call it on the unedited model. Returns (μ, info) with the sample size and norm range.
    """
    from fastedit.editing.targets import compute_targets

    if not requests:
        raise InputError("NAS needs at least one request to estimate its anchor")
    norms = []
    vparams = hparams.vstar_params()
    for start in range(0, len(requests), batch_size):
        t = compute_targets(model, tok, adapter, requests[start:start + batch_size], layer,
                            templates=BARE_PROMPT, hparams=vparams, progress=progress,
                            autocast=getattr(hparams, "vstar_autocast", None))
        norms.append((t.v0.to(torch.float64) + t.delta.to(torch.float64)).norm(dim=-1).cpu())
    norms = torch.cat(norms)
    mu = float(linalg.anchor_from_norms(norms, trim_quantile=hparams.nas_trim_quantile))
    return mu, {"n": int(norms.numel()), "norm_min": float(norms.min()), "norm_max": float(norms.max()),
                "trim_quantile": hparams.nas_trim_quantile, "prompts": "bare"}


def anchor_key(model_fingerprint: str, layer: int, hparams, requests: list) -> str:
    """A hash of everything the anchor depends on: model, layer, v* knobs, sample, trimming."""
    h = hashlib.sha256()
    sample = [(r.prompt, r.subject, r.target_new) for r in requests]
    knobs = {k: getattr(hparams, k) for k in ("v_num_grad_steps", "v_lr", "clamp_norm_factor", "kl_factor",
                                              "v_weight_decay", "nas_trim_quantile")}
    if getattr(hparams, "vstar_autocast", None) is not None:  # only then: earlier keys stay valid
        knobs["vstar_autocast"] = hparams.vstar_autocast
    # ANCHOR_RULE names how μ is computed, so entries cached under an earlier rule are not reused
    h.update(json.dumps([model_fingerprint, layer, knobs, sample, ANCHOR_RULE], sort_keys=True).encode())
    return h.hexdigest()[:20]


def weight_fingerprint(model, adapter, layer: int) -> str:
    """Identifies an (unedited) model at a layer: its name and moments of the rewrite weight."""
    w = adapter.weight(layer).detach().to(torch.float64)
    name = getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
    return f"{name}|{adapter.layout.rewrite}|{layer}|{w.sum().item():.12e}|{w.square().sum().item():.12e}"


class AnchorCache:
    """Anchors μ by key, in memory and, with ``directory``, as small JSON files there."""

    def __init__(self, directory=None):
        self.directory = pathlib.Path(directory) if directory is not None else None
        self._mem: dict[str, dict] = {}

    def _path(self, key: str) -> pathlib.Path:
        return self.directory / f"nas_anchor_{key}.json"

    def get(self, key: str) -> dict | None:
        if key in self._mem:
            return self._mem[key]
        if self.directory is not None and self._path(key).is_file():
            try:
                entry = json.loads(self._path(key).read_text())
            except (OSError, json.JSONDecodeError):
                return None  # a damaged cache entry is recomputed, and rewritten below
            if isinstance(entry, dict) and isinstance(entry.get("mu"), (int, float)) and entry["mu"] > 0:
                self._mem[key] = entry
                return entry
        return None

    def put(self, key: str, entry: dict) -> None:
        self._mem[key] = entry
        if self.directory is not None:
            _io.ensure_directory(self.directory, "the NAS anchor cache directory")
            _io.write_json(self._path(key), entry)  # atomic: a reader never sees half a file
