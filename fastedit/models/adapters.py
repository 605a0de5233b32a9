"""Where the pieces an editor needs live in a Hugging Face causal LM.

For an edited layer l the *rewrite module* is the MLP output projection; its input is the key
k (size d_k) and its output the value m (size d). The *block* is the transformer layer whose
output is the residual stream h_l. W is always handled as (d, d_k): GPT-2's Conv1D stores
(d_k, d) and is transposed here, at the boundary (ALGORITHMS.md, notation and section 11).

Adapters are chosen from ``model.config.model_type``; any other model works by passing the
module-name templates explicitly (``rewrite="model.layers.{}.mlp.down_proj"`` etc.).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fastedit.errors import InputError


@dataclass(frozen=True)
class Layout:
    """Module-name templates of one architecture; ``{}`` is the layer index.

    ``post_mlp_norm`` names the norm that some families (Gemma 2/3, OLMo 2/3) apply to the MLP
    output before adding it to the residual stream: block output = residual + post(m), m the
    rewrite module's output. ``None`` for the pre-norm families, where block output = residual + m.
    """

    block: str
    rewrite: str
    final_norm: str
    lm_head: str
    embed: str
    post_mlp_norm: str | None = None


LAYOUTS: dict[str, Layout] = {
    "gpt2": Layout("transformer.h.{}", "transformer.h.{}.mlp.c_proj", "transformer.ln_f", "lm_head", "transformer.wte"),
    "gptj": Layout("transformer.h.{}", "transformer.h.{}.mlp.fc_out", "transformer.ln_f", "lm_head", "transformer.wte"),
    "gpt_neox": Layout("gpt_neox.layers.{}", "gpt_neox.layers.{}.mlp.dense_4h_to_h",
                       "gpt_neox.final_layer_norm", "embed_out", "gpt_neox.embed_in"),
}
for _name in ("llama", "mistral", "qwen2", "qwen3", "gemma"):
    LAYOUTS[_name] = Layout("model.layers.{}", "model.layers.{}.mlp.down_proj", "model.norm", "lm_head",
                            "model.embed_tokens")
for _name in ("gemma2", "gemma3_text", "olmo2", "olmo3"):
    LAYOUTS[_name] = Layout("model.layers.{}", "model.layers.{}.mlp.down_proj", "model.norm", "lm_head",
                            "model.embed_tokens", post_mlp_norm="model.layers.{}.post_feedforward_layernorm")


def _get(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise InputError(f"the model has no module {name!r}; pass the module-name templates of this "
                         "architecture to get_adapter(...) (see fastedit.models.LAYOUTS for examples)") from None


class ModelAdapter:
    """Access to blocks, rewrite modules (keys/values), final norm and LM head of one model.

    ``weight(l)`` returns the rewrite weight as a (d, d_k) view of the parameter (a transposed
    view for Conv1D), so ``adapter.weight(l).add_(dW)`` edits the model in place whatever the
    storage layout.
    """

    def __init__(self, model: nn.Module, layout: Layout):
        self.model = model
        self.layout = layout
        self.num_layers = self._count_layers()
        probe = self.rewrite_module(0)
        self.transposed = type(probe).__name__ == "Conv1D"
        w = self.weight(0)
        self.d, self.d_k = int(w.shape[0]), int(w.shape[1])

    def _count_layers(self) -> int:
        n = 0
        while True:
            try:
                self.model.get_submodule(self.layout.block.format(n))
            except AttributeError:
                break
            n += 1
        if n == 0:
            _get(self.model, self.layout.block.format(0))
        return n

    def check_layer(self, layer: int) -> int:
        if not isinstance(layer, int) or not 0 <= layer < self.num_layers:
            raise InputError(f"layer {layer!r} is out of range: this model has layers 0..{self.num_layers - 1}")
        return layer

    def block(self, layer: int) -> nn.Module:
        return _get(self.model, self.layout.block.format(self.check_layer(layer)))

    def rewrite_name(self, layer: int) -> str:
        return self.layout.rewrite.format(self.check_layer(layer))

    def rewrite_module(self, layer: int) -> nn.Module:
        return _get(self.model, self.rewrite_name(layer))

    def weight_param(self, layer: int) -> nn.Parameter:
        """The stored parameter ((d, d_k) for Linear, (d_k, d) for Conv1D)."""
        return self.rewrite_module(layer).weight

    def weight(self, layer: int) -> torch.Tensor:
        """The rewrite weight as a (d, d_k) view of the parameter's data."""
        w = self.weight_param(layer).data
        return w.T if self.transposed else w

    def post_mlp_norm(self, layer: int) -> nn.Module | None:
        """The norm between the rewrite module's output and the residual stream, or None."""
        if self.layout.post_mlp_norm is None:
            return None
        return _get(self.model, self.layout.post_mlp_norm.format(self.check_layer(layer)))

    def block_offset(self, layer: int, m: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """Change of block ``layer``'s output at a token whose rewrite-module output moves from
        ``m`` to ``m + delta`` (both (..., d)): ``delta`` itself for the pre-norm families,
        ``post(m + delta) − post(m)`` where a post-MLP norm sits in between. Differentiable in
        ``delta``; v* optimises δ at the rewrite module's output through this, so that the
        update ΔW·k = δ is exactly what the model computes (ALGORITHMS.md section 5)."""
        post = self.post_mlp_norm(layer)
        if post is None:
            return delta
        return post(m + delta) - post(m)

    @property
    def logit_softcap(self) -> float | None:
        """Gemma-style final-logit soft-capping c (logits = c·tanh(logits / c)), or None."""
        cap = getattr(getattr(self.model, "config", None), "final_logit_softcapping", None)
        return float(cap) if cap else None

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The logits the model reads from a last-block output (..., d): the LM head of the
        final norm, soft-capped where the config says so."""
        out = self.lm_head(self.final_norm(hidden))
        cap = self.logit_softcap
        if cap is not None:
            out = torch.tanh(out / cap) * cap
        return out

    @property
    def final_norm(self) -> nn.Module:
        return _get(self.model, self.layout.final_norm)

    @property
    def lm_head(self) -> nn.Module:
        return _get(self.model, self.layout.lm_head)

    @property
    def embed(self) -> nn.Module:
        return _get(self.model, self.layout.embed)

    @property
    def device(self) -> torch.device:
        return self.weight_param(0).device

    @property
    def dtype(self) -> torch.dtype:
        return self.weight_param(0).dtype

    def __repr__(self) -> str:
        return (f"ModelAdapter({type(self.model).__name__}, layers={self.num_layers}, d={self.d}, "
                f"d_k={self.d_k}, rewrite={self.layout.rewrite!r}, transposed={self.transposed})")


def get_adapter(model: nn.Module, *, block: str | None = None, rewrite: str | None = None,
                final_norm: str | None = None, lm_head: str | None = None, embed: str | None = None,
                post_mlp_norm: str | None = None) -> ModelAdapter:
    """The adapter of ``model``: detected from ``config.model_type``, each template overridable.

    For an architecture not in :data:`LAYOUTS`, pass the five required templates
    (``post_mlp_norm`` too where the family normalises the MLP output).
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    base = LAYOUTS.get(model_type)
    given = dict(block=block, rewrite=rewrite, final_norm=final_norm, lm_head=lm_head, embed=embed)
    if base is None:
        missing = [k for k, v in given.items() if v is None]
        given["post_mlp_norm"] = post_mlp_norm
        if missing:
            raise InputError(f"no built-in layout for model_type {model_type!r} (known: {', '.join(sorted(LAYOUTS))}); "
                             f"pass the module-name templates {', '.join(missing)} to get_adapter")
        return ModelAdapter(model, Layout(**given))
    fields = {k: (v if v is not None else getattr(base, k)) for k, v in given.items()}
    fields["post_mlp_norm"] = post_mlp_norm if post_mlp_norm is not None else base.post_mlp_norm
    return ModelAdapter(model, Layout(**fields))
