"""The method drivers: a solver × a strategy, run on one batch of requests.

Solvers (ALGORITHMS.md sections 2 and 4), one object per edited layer:

- ``memit``: ΔW = R Kᵀ(λC0 + KKᵀ)⁻¹ with λC0 factored once; C0 stays fixed across batches.
- ``memit_seq``: the same with A_t = λC0 + μI + Σ_p K_pK_pᵀ, the keys of every earlier batch.
- ``alphaedit``: ΔWᵀ = Q(Qᵀ(C_p + KKᵀ)Q + αI)⁻¹QᵀKRᵀ, Q the null space of C0, C_p the keys of
  earlier batches. The reference recomputes a batch's keys on the edited model after all its
  layers are edited before adding them to C_p. Layer l's keys are the input of its rewrite module:
  they depend on the layers below l and on l's attention and up-projection, never on l's or a
  later layer's rewrite weight, and layers are edited in increasing order, so the keys each layer
  was solved with ARE the recomputed keys. They are accumulated directly (no extra forward pass);
  tests/test_methods.py checks the identity against a recomputation.

Strategies (sections 3 and 6):

- ``distribute`` (MEMIT's loop): z at the last critical layer; for each layer in order, K on the
  current model, cur = last critical layer's output on the current model,
  R = (z − cur) / (layers remaining), solve, apply.
- ``blue``: z, K and the full residual z − cur at the first critical layer, apply; then the
  same at the last critical layer on the updated model. Only those two layers change.

NAS (section 7) rescales v* only where a fact is written from scratch: the last critical layer
of ``distribute`` (its one v*) and the first boundary layer of ``blue``. BLUE's second v* is
optimised on the model that already holds the first layer's update, so its δ is a small
correction; rescaling that v* = v0 + δ to an anchor measured on the unedited model would give
the residual s·δ + (s − 1)·v0 with s = μ/‖v*‖ ≫ 1, writing a multiple of the subject's
existing MLP output v0 into the weights. So the last boundary layer takes z = h_init + δ as is,
and an edit is dropped (if at all) before any layer is written.

Value post-processing ``nas`` and the weight-side ``rect`` hook in here; ``prune`` acts after a
whole sequence and lives in the Editor. The MLP output adds straight into the residual stream,
so ΔW K ≈ R, with R a residual-stream difference, is the write both references make.
Where a norm sits between the MLP output and the residual stream (Gemma 2/3, OLMo 2/3), a
residual-stream difference is not what ΔW K adds, so targets and current values are taken in
the rewrite module's output space instead: the target v* = v0 + δ and cur = the rewrite
module's output at the lookup token (``BatchRun.value_space``).
"""
from __future__ import annotations

import time
from typing import Callable

import torch

from fastedit import _mem, linalg
from fastedit.editing.keys import HiddenCache, block_outputs_at_lookup, compute_keys, values_at_lookup
from fastedit.editing.nas import apply_anchor
from fastedit.editing.regularizers import rect
from fastedit.editing.targets import compute_targets
from fastedit.errors import InputError

METHODS = ("memit", "memit_seq", "alphaedit")
STRATEGIES = ("distribute", "blue")
REGULARIZERS = (None, "rect", "prune")


class LayerSolver:
    """The closed-form solve of one layer and the state it keeps across batches."""

    sequential = False

    def solve(self, K: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
        """ΔW (d, d_k) for keys K (d_k, n) and residuals R (d, n)."""
        raise NotImplementedError

    def accumulate(self, K: torch.Tensor, sign: int = 1) -> None:
        """Add (sign=1) or remove (sign=-1) the keys of a finished batch to the sequential state."""


class MemitSolver(LayerSolver):
    """MEMIT (``sequential=False``: A = λC0 for every batch) or MEMIT_seq (A grows by KKᵀ)."""

    def __init__(self, C0: torch.Tensor, lam: float, *, layer: int, sequential: bool = False, mu: float = 0.0):
        self.sequential = sequential
        self.impl = linalg.UpdateSolver(C0, lam, mu=mu if sequential else 0.0, dtype=torch.float64, layer=layer)

    def solve(self, K, R):
        return self.impl.solve(K, R)

    def accumulate(self, K, sign=1):
        if self.sequential:
            self.impl.accumulate(K, sign=sign)


class AlphaEditSolver(LayerSolver):
    """AlphaEdit's reduced null-space solve with ridge α = L2, C_p accumulated across batches."""

    sequential = True

    def __init__(self, C0: torch.Tensor, *, threshold: float, alpha: float, layer: int, null_space=None):
        self.impl = null_space if null_space is not None else linalg.NullSpace.from_covariance(
            C0, threshold=threshold, layer=layer)
        self.alpha = float(alpha)
        self.layer = layer
        if self.impl.rank == 0:
            raise InputError(f"layer {layer}: C0 has no eigenvalue below the null-space threshold {threshold:g}, "
                             "so AlphaEdit cannot edit it; raise EditParams.nullspace_threshold or check C0")

    def solve(self, K, R):
        return self.impl.solve(K, R, self.alpha)

    def accumulate(self, K, sign=1):
        self.impl.accumulate(K, sign=sign)


def make_solver(method: str, C0: torch.Tensor, hparams, layer: int, *, null_space=None) -> LayerSolver:
    """The :class:`LayerSolver` of ``method`` for one layer with covariance C0 (d_k, d_k).
    ``null_space``: AlphaEdit's basis of C0 computed before (e.g. read from the statistics cache)."""
    if method == "memit":
        return MemitSolver(C0, hparams.lam, layer=layer)
    if method == "memit_seq":
        return MemitSolver(C0, hparams.lam, layer=layer, sequential=True, mu=hparams.mu)
    if method == "alphaedit":
        return AlphaEditSolver(C0, threshold=hparams.nullspace_threshold, alpha=hparams.L2, layer=layer,
                               null_space=null_space)
    raise InputError(f"method must be one of {', '.join(METHODS)}, got {method!r}")


def edited_layers(strategy: str, hparams) -> tuple:
    """The layers a strategy writes to."""
    if strategy == "distribute":
        return tuple(hparams.layers)
    if strategy == "blue":
        return tuple(hparams.boundary_layers)
    raise InputError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")


def anchor_layer(strategy: str, hparams) -> int:
    """The one layer whose v* NAS anchors and rescales: where the strategy writes a fact from
    scratch (the last critical layer for ``distribute``, the first boundary layer for ``blue``)."""
    if strategy == "distribute":
        return hparams.layers[-1]
    if strategy == "blue":
        return hparams.boundary_layers[0]
    raise InputError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")


class BatchRun:
    """One batch through a strategy: holds what the strategy needs and records what it did.

    ``stage`` always names the step in progress, so a failure can say where it happened.
    ``kept`` are the positions (in ``requests``) still being edited: NAS may drop some.
    ``written`` maps a position to the layers whose applied, non-zero ΔW was solved with its key
    and residual: the report's "edited" are exactly these. NAS decides at the first v* a
    strategy computes, before any layer is written, so a dropped edit is never in ``written``.
    """

    def __init__(self, *, model, tok, adapter, requests, templates, hparams, solvers: dict,
                 anchors: dict | None = None, regularizer: str | None = None,
                 sync: Callable[[], None] = lambda: None):
        self.model, self.tok, self.adapter = model, tok, adapter
        self.requests = list(requests)
        self.templates = templates
        self.hparams = hparams
        self.vparams = hparams.vstar_params()
        self.solvers = solvers
        self.anchors = anchors
        self.regularizer = regularizer
        self.sync = sync
        self.kept = list(range(len(self.requests)))
        self.stage = "targets"
        self.times: dict[str, float] = {}
        self.vstar: dict[int, dict] = {}
        self.dropped: list[dict] = []
        self.layers: dict[int, dict] = {}
        self.solved_keys: dict[int, torch.Tensor] = {}
        self.written: dict[int, list[int]] = {}
        # The key prompts' hidden states entering the last layer whose keys were read: the next
        # layer's key pass starts there (keys.HiddenCache; the same keys, fewer blocks run).
        self.key_cache = HiddenCache()
        self.key_blocks: dict[int, dict] = {}

    # -- bookkeeping
    def _timed(self, stage: str, fn, *args, **kwargs):
        self.stage = stage
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        self.sync()
        _mem.trim(self.adapter.device)  # a stage's temporaries are gone: give their pages back
        self.times[stage] = self.times.get(stage, 0.0) + time.perf_counter() - t0
        return out

    @property
    def kept_requests(self) -> list:
        return [self.requests[i] for i in self.kept]

    # -- steps
    def value_space(self, layer: int) -> bool:
        """Whether targets and residuals at ``layer`` live in the rewrite module's output space
        (a post-MLP norm sits between it and the residual stream) instead of the block's."""
        return self.adapter.post_mlp_norm(layer) is not None

    def targets(self, layer: int, *, anchor: bool = True) -> torch.Tensor:
        """z (n_kept, d) in float64 at ``layer`` for the kept requests (v* = v0 + δ where
        :meth:`value_space`).

        With NAS on and ``anchor``, z = (h_init − v0) + v*·μ/‖v*‖ and the edits with
        ‖v*‖ > nas_max_ratio·μ are dropped; with ``anchor=False`` (BLUE's last boundary layer),
        z = h_init + δ, unscaled.
        """
        t = self._timed("targets", compute_targets, self.model, self.tok, self.adapter, self.kept_requests, layer,
                        templates=self.templates, hparams=self.vparams, max_chunk_tokens=self.hparams.max_chunk_tokens,
                        checkpoint=self.hparams.vstar_checkpoint, autocast=self.hparams.vstar_autocast)
        rec = {"steps": _tolist(t.steps), "loss": _tolist(t.loss), "nll": _tolist(t.nll),
               "delta_norm": _tolist(t.delta.to(torch.float64).norm(dim=-1)), "requests": list(self.kept),
               "chunks": t.chunks, "path": t.path}
        self.vstar[layer] = rec
        values = self.value_space(layer)
        z = (t.v0.to(torch.float64) + t.delta.to(torch.float64)) if values else t.z.to(torch.float64)
        if self.anchors is not None and anchor:
            self.stage = "nas"
            # In the value space the target is the rescaled v* itself: h_init − v0 drops out.
            a = apply_anchor(t.v0 if values else t.h_init, t.v0, t.delta, self.anchors[layer],
                             self.hparams.nas_max_ratio)
            rec["v_norm"] = _tolist(a.v_norm)
            keep = a.keep.cpu().tolist()
            for pos, k in enumerate(keep):
                if not k:
                    i = self.kept[pos]
                    self.dropped.append({"request": i, "case_id": self.requests[i].case_id, "layer": layer,
                                         "v_norm": float(a.v_norm[pos]), "anchor": self.anchors[layer],
                                         "ratio": float(a.v_norm[pos]) / self.anchors[layer]})
            sel = torch.tensor([p for p, k in enumerate(keep) if k], dtype=torch.long, device=z.device)
            self.kept = [self.kept[p] for p, k in enumerate(keep) if k]
            z = a.z.index_select(0, sel)
        return z

    def keys(self, layer: int) -> torch.Tensor:
        c = self.key_cache
        before = c.blocks_run, c.blocks_skipped
        K = self._timed("keys", compute_keys, self.model, self.tok, self.adapter, self.kept_requests, [layer],
                        templates=self.templates, max_chunk_tokens=self.hparams.max_chunk_tokens, cache=c)[layer]
        self.key_blocks[layer] = {"key_blocks_run": c.blocks_run - before[0],
                                  "key_blocks_skipped": c.blocks_skipped - before[1]}
        return K.to(torch.float64)

    def current(self, layer: int) -> torch.Tensor:
        """The block output at ``layer`` and each kept request's lookup token, (n_kept, d) float64
        (the rewrite module's output there where :meth:`value_space`)."""
        read = values_at_lookup if self.value_space(layer) else block_outputs_at_lookup
        cur = self._timed("residual", read, self.model, self.tok, self.adapter, self.kept_requests, layer,
                          max_chunk_tokens=self.hparams.max_chunk_tokens)
        # On the device the targets z live on (the inputs'), whatever device this block is on.
        return cur.to(device=self.adapter.device, dtype=torch.float64)

    def solve_and_apply(self, layer: int, K: torch.Tensor, R: torch.Tensor) -> None:
        """ΔW by this layer's solver (with RECT when asked), added to the layer's weight. Keys and
        residuals move to the layer's weight device, where its solver state lives.

        RECT masks here, before the next layer is measured (see :mod:`fastedit.editing.regularizers`)."""
        W = self.adapter.weight(layer)
        K, R = K.to(W.device), R.to(W.device)
        dW = self._timed("solve", self.solvers[layer].solve, K, R)
        info = {"n": int(K.shape[1]), "residual_norm": float(R.norm())}
        if self.regularizer == "rect":
            dW = self._timed("solve", rect, dW, W, self.hparams.rect_keep)
            info["rect_kept"] = int((dW != 0).sum())
        self.stage = "apply"
        t0 = time.perf_counter()
        info["w_norm_before"] = float(W.to(torch.float64).norm())
        W.add_(dW.to(device=W.device, dtype=W.dtype))
        self.key_cache.changed(layer)
        info["w_norm_after"] = float(W.to(torch.float64).norm())
        info["delta_norm"] = float(dW.norm())
        if info["delta_norm"] > 0:
            for i in self.kept:
                self.written.setdefault(i, []).append(layer)
        self.sync()
        self.times["apply"] = self.times.get("apply", 0.0) + time.perf_counter() - t0
        self.layers[layer] = {**info, **self.key_blocks.get(layer, {})}
        self.solved_keys[layer] = K


def run_distribute(run: BatchRun) -> None:
    """MEMIT's residual distribution over ``run.hparams.layers`` (section 3)."""
    layers = run.hparams.layers
    z = run.targets(layers[-1])
    for i, layer in enumerate(layers):
        if not run.kept:
            return
        K = run.keys(layer)
        if i == len(layers) - 1:
            run.key_cache.clear()
        cur = run.current(layers[-1])
        R = (z - cur).T / (len(layers) - i)
        run.solve_and_apply(layer, K, R)


def run_blue(run: BatchRun) -> None:
    """BLUE: full residuals at the first, then (on the updated model) the last critical layer.

    NAS acts on the first boundary layer's v* only (see the module docstring). The last layer's
    keys are read before its v*: the same model (the first layer already updated), so the same
    keys, read while the first key pass's hidden states are kept, which are dropped before v*."""
    for i, layer in enumerate(run.hparams.boundary_layers):
        if not run.kept:
            return
        early = None
        if i > 0:
            early = (list(run.kept), run.keys(layer))
            run.key_cache.clear()
        z = run.targets(layer, anchor=i == 0)
        if not run.kept:
            return
        K = early[1] if early is not None and early[0] == run.kept else run.keys(layer)
        cur = run.current(layer)
        run.solve_and_apply(layer, K, (z - cur).T)


STRATEGY_FUNCS = {"distribute": run_distribute, "blue": run_blue}


def _tolist(t) -> list:
    return torch.as_tensor(t).detach().to("cpu").tolist()
