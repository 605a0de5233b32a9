"""Every knob of the editing methods, in one dataclass (ALGORITHMS.md section 10).

Named presets with the reference values live in :mod:`fastedit.editing.presets` (public name
:mod:`fastedit.presets`); the reference repositories' and EasyEdit's files are read into this
dataclass by :func:`fastedit.compat.load_hparams`. This module only defines the fields, their
meaning and their validation.
"""
from __future__ import annotations

import dataclasses
import operator
from dataclasses import dataclass, field

from fastedit.errors import InputError

#: The dtypes v* may autocast its replayed blocks to (EditParams.vstar_autocast, --vstar-autocast).
VSTAR_AUTOCAST = ("bfloat16",)


@dataclass(frozen=True)
class EditParams:
    """Hyperparameters of MEMIT / AlphaEdit / BLUE / NAS / RECT / PRUNE.

    Attributes:
        layers: critical layers, in order (MEMIT/AlphaEdit's ``distribute`` edits all of them).
        blue_layers: the two layers BLUE edits; default ``(layers[0], layers[-1])``.
        lam: ``mom2_update_weight`` λ, multiplying the per-token mean covariance C0.
        mu: ridge μ added to A = λC0 + ΣK_pK_pᵀ + μI by ``memit_seq`` (0 in the references).
        v_num_grad_steps, v_lr: Adam iterations (at most ``v_num_grad_steps − 1`` steps are
            taken, as in the references) and learning rate of the v* optimisation.
        clamp_norm_factor: ‖δ‖ ≤ clamp_norm_factor · ‖h_init‖ after each step.
        kl_factor: weight of KL(p_current ‖ p_initial) on the "{subject} is a" prompt.
        v_weight_decay: weight of ‖δ‖ / ‖h_init‖² (unsquared ‖δ‖, as the references).
        nullspace_threshold: AlphaEdit keeps eigenvectors of C0 with eigenvalue below this.
        L2: AlphaEdit's α (ridge in the null space); the BLUE variant uses its own value.
        rect_keep: fraction of ΔW entries RECT keeps (largest relative change).
        nas_max_ratio: NAS drops an edit whose ‖v*‖ exceeds nas_max_ratio · μ_anchor.
        nas_sample_size: number of requests whose ‖v*‖ on the unedited model set the anchor.
        nas_trim_quantile: the anchor's mean leaves out the ⌊(1 − nas_trim_quantile)·m⌋ largest of m norms.
        nas_seed: seed of the random choice of the anchor sample when more are given.
        context_n, context_length: number and token length of generated context prefixes.
        max_chunk_tokens: memory budget of v*, the key pass and the residual reads, in padded
            token positions per chunk (None: from the device's free memory, or a fixed 128 MiB
            on the CPU: :func:`fastedit.editing.tokens.default_max_tokens`). Chunking does not
            change results; a batch of any size runs in the memory of one chunk.
        vstar_checkpoint: recompute the blocks v* replays in its backward pass instead of keeping
            their activations (less memory per chunk, about a third more v* compute; same values).
        vstar_autocast: None (default) or "bfloat16": v* runs the blocks above the edited layer
            and the LM head under ``torch.autocast`` in bfloat16, δ and its Adam state staying in
            float32 (float64 models are unaffected; :func:`fastedit.editing.targets.compute_targets`).
            For float32 models on GPUs; it changes δ at bfloat16's precision.
    """

    layers: tuple = (4, 5, 6, 7, 8)
    blue_layers: tuple | None = None
    lam: float = 15000.0
    mu: float = 0.0
    v_num_grad_steps: int = 25
    v_lr: float = 0.5
    clamp_norm_factor: float = 0.75
    kl_factor: float = 0.0625
    v_weight_decay: float = 0.5
    nullspace_threshold: float = 2e-2
    L2: float = 10.0
    rect_keep: float = 0.4
    nas_max_ratio: float = 2.0
    nas_sample_size: int = 1000
    nas_trim_quantile: float = 0.95
    nas_seed: int = 0
    context_n: int = 5
    context_length: int = 10
    max_chunk_tokens: int | None = None
    vstar_checkpoint: bool = False
    vstar_autocast: str | None = None
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        layers = _layer_tuple("layers", self.layers)
        object.__setattr__(self, "layers", layers)
        if not layers:
            raise InputError("EditParams.layers is empty: give the critical layers to edit, e.g. (4, 5, 6, 7, 8)")
        if list(layers) != sorted(set(layers)):
            raise InputError(f"EditParams.layers {layers} must be strictly increasing")
        if self.blue_layers is not None:
            bl = _layer_tuple("blue_layers", self.blue_layers)
            if len(bl) != 2 or bl[0] >= bl[1]:
                raise InputError(f"EditParams.blue_layers {self.blue_layers} must be two increasing layers (first, last)")
            object.__setattr__(self, "blue_layers", bl)
        for name in ("lam", "v_lr", "clamp_norm_factor", "nas_max_ratio"):
            if not getattr(self, name) > 0:
                raise InputError(f"EditParams.{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("mu", "kl_factor", "v_weight_decay", "L2", "nullspace_threshold"):
            if not getattr(self, name) >= 0:
                raise InputError(f"EditParams.{name} must be >= 0, got {getattr(self, name)!r}")
        if self.v_num_grad_steps < 1 or self.nas_sample_size < 1:
            raise InputError("EditParams.v_num_grad_steps and nas_sample_size must be >= 1")
        if self.max_chunk_tokens is not None and (isinstance(self.max_chunk_tokens, bool) or not
                                                  isinstance(self.max_chunk_tokens, int) or self.max_chunk_tokens < 1):
            raise InputError(f"EditParams.max_chunk_tokens must be a positive integer or None, got "
                             f"{self.max_chunk_tokens!r}")
        if not isinstance(self.vstar_checkpoint, bool):
            raise InputError(f"EditParams.vstar_checkpoint must be True or False, got {self.vstar_checkpoint!r}")
        if self.vstar_autocast is not None and self.vstar_autocast not in VSTAR_AUTOCAST:
            raise InputError(f"EditParams.vstar_autocast must be None (off) or "
                             f"{' or '.join(map(repr, VSTAR_AUTOCAST))}, got {self.vstar_autocast!r}")
        if not 0 < self.rect_keep <= 1:
            raise InputError(f"EditParams.rect_keep must be in (0, 1], got {self.rect_keep!r}")
        if not 0 < self.nas_trim_quantile <= 1:
            raise InputError(f"EditParams.nas_trim_quantile must be in (0, 1], got {self.nas_trim_quantile!r}")

    @property
    def boundary_layers(self) -> tuple:
        """The (first, last) critical layers BLUE edits."""
        return self.blue_layers if self.blue_layers is not None else (self.layers[0], self.layers[-1])

    def replace(self, **changes) -> "EditParams":
        """A copy with some fields changed (validated again)."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise InputError(f"unknown EditParams field(s): {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["layers"] = list(self.layers)
        d["blue_layers"] = list(self.boundary_layers)
        return d

    def vstar_params(self):
        """The v* optimisation's parameters, as :class:`fastedit.editing.targets.VStarParams`."""
        from fastedit.editing.targets import VStarParams

        return VStarParams(v_num_grad_steps=self.v_num_grad_steps, v_lr=self.v_lr,
                           clamp_norm_factor=self.clamp_norm_factor, kl_factor=self.kl_factor,
                           v_weight_decay=self.v_weight_decay)



def _layer_tuple(name: str, layers) -> tuple:
    """Layer indices as ints; 1.5 or True is refused rather than truncated to a layer."""
    if isinstance(layers, (str, bytes)) or not hasattr(layers, "__iter__"):
        raise InputError(f"EditParams.{name} must be a sequence of integer layer indices, got {layers!r}")
    out = []
    for l in layers:
        if isinstance(l, bool):
            raise InputError(f"EditParams.{name}: {l!r} is not a layer index")
        try:
            out.append(operator.index(l))
        except TypeError:
            raise InputError(f"EditParams.{name}: {l!r} is not an integer layer index (in {tuple(layers)!r})") from None
    return tuple(out)
