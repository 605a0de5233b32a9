"""Where the pieces an editor needs live in a Hugging Face causal LM.

For an edited layer l the *rewrite module* is the MLP output projection; its input is the key
k (size d_k) and its output the value m (size d). The *block* is the transformer layer whose
output is the residual stream h_l. W is always handled as (d, d_k): GPT-2's Conv1D stores
(d_k, d) and is transposed here, at the boundary (ALGORITHMS.md, notation and section 11).

A :class:`Layout` names the modules by template (``{}`` is the layer index). Built-in layouts
(:data:`LAYOUTS`) are chosen from ``model.config.model_type``; any other model, or a renamed
module, works by giving a layout: ``get_adapter(model, layout={...})``, ``Editor(...,
layout=...)``, ``collect_stats(..., layout=...)`` or ``--layout`` on the command line. What the
model's own accessors can tell is asked from them, so renames across transformers versions do
not break a family: the LM head is ``get_output_embeddings()``, the embedding
``get_input_embeddings()``, the number of layers ``config.num_hidden_layers`` and, when no
block template is given, the blocks are the model's decoder layer list.

Models an edit cannot be exact on are refused when the adapter is made, before anything runs:
quantised (bitsandbytes 8/4-bit) or non-floating rewrite weights, parameters on the meta device
(not loaded, or offloaded to disk/CPU by accelerate), mixture-of-experts MLPs and post-norm
blocks (the residual stream itself normalised after the MLP is added, e.g. OPT-350m).
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
from dataclasses import dataclass

import torch
from torch import nn

from fastedit.errors import InputError


@dataclass(frozen=True)
class Layout:
    """Module-name templates of one architecture; ``{}`` is the layer index.

    - ``rewrite``: the MLP output projection of layer l (an ``nn.Linear`` or GPT-2's ``Conv1D``).
    - ``final_norm``: the norm applied to the last block's output before the LM head.
    - ``block``: the transformer layer whose output is the residual stream; None means the
      model's decoder layer list (the one ``nn.ModuleList`` of ``config.num_hidden_layers``).
    - ``lm_head``, ``embed``: None means ``model.get_output_embeddings()`` /
      ``get_input_embeddings()``.
    - ``post_mlp_norm``: the norm that some families (Gemma 2/3, OLMo 2/3) apply to the MLP
      output before adding it to the residual stream: block output = residual + post(m), m the
      rewrite module's output. ``None`` for the pre-norm families, where block output =
      residual + m.
    """

    rewrite: str
    final_norm: str
    block: str | None = None
    lm_head: str | None = None
    embed: str | None = None
    post_mlp_norm: str | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


FIELDS = tuple(f.name for f in dataclasses.fields(Layout))


def _layout(rewrite: str, final_norm: str, block: str, **kw) -> Layout:
    return Layout(rewrite=rewrite, final_norm=final_norm, block=block, **kw)


LAYOUTS: dict[str, Layout] = {
    "gpt2": _layout("transformer.h.{}.mlp.c_proj", "transformer.ln_f", "transformer.h.{}"),
    "gptj": _layout("transformer.h.{}.mlp.fc_out", "transformer.ln_f", "transformer.h.{}"),
    # The head is found through get_output_embeddings(): transformers 5 calls it lm_head, 4.x embed_out.
    "gpt_neox": _layout("gpt_neox.layers.{}.mlp.dense_4h_to_h", "gpt_neox.final_layer_norm", "gpt_neox.layers.{}"),
    "falcon": _layout("transformer.h.{}.mlp.dense_4h_to_h", "transformer.ln_f", "transformer.h.{}"),
    "bloom": _layout("transformer.h.{}.mlp.dense_4h_to_h", "transformer.ln_f", "transformer.h.{}"),
    "phi": _layout("model.layers.{}.mlp.fc2", "model.final_layernorm", "model.layers.{}"),
    "opt": _layout("model.decoder.layers.{}.fc2", "model.decoder.final_layer_norm", "model.decoder.layers.{}"),
}
for _name in ("llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "olmo", "stablelm"):
    LAYOUTS[_name] = _layout("model.layers.{}.mlp.down_proj", "model.norm", "model.layers.{}")
for _name in ("gemma2", "gemma3_text", "olmo2", "olmo3"):
    LAYOUTS[_name] = _layout("model.layers.{}.mlp.down_proj", "model.norm", "model.layers.{}",
                             post_mlp_norm="model.layers.{}.post_feedforward_layernorm")

#: Families whose rewrite module sees its tokens flattened to (batch·seq, width) (OPT's fc2).
_FLAT_TOKENS = {"opt"}


def load_layout(value) -> dict:
    """The layout fields given by ``value``, as a dict (only the fields it names).

    ``value`` is a :class:`Layout`, a dict of field names, a path to a JSON file holding such
    a dict, or a string ``"rewrite=model.layers.{}.mlp.down_proj,final_norm=model.norm"``
    (comma-separated ``field=template`` pairs; what ``--layout`` takes on the command line).
    """
    if value is None:
        return {}
    if isinstance(value, Layout):
        return value.to_dict()
    if isinstance(value, (str, pathlib.Path)):
        text = str(value)
        path = pathlib.Path(text)
        if path.suffix == ".json" or path.is_file():
            try:
                value = json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                raise InputError(f"cannot read the layout file {text!r}: {exc}") from None
        else:
            pairs = [p for p in text.split(",") if p.strip()]
            if not pairs or any("=" not in p for p in pairs):
                raise InputError(f"layout {text!r} must be a JSON file or field=template pairs separated by "
                                 f"commas (fields: {', '.join(FIELDS)})")
            value = dict(p.strip().split("=", 1) for p in pairs)
    if not isinstance(value, dict):
        raise InputError(f"a layout must be a Layout, a dict, a JSON file or field=template pairs; "
                         f"got {type(value).__name__}")
    unknown = sorted(set(value) - set(FIELDS))
    if unknown:
        raise InputError(f"unknown layout field(s) {', '.join(unknown)}; the fields are {', '.join(FIELDS)}")
    for k, v in value.items():
        if v is not None and not isinstance(v, str):
            raise InputError(f"layout field {k!r} must be a module-name string, got {type(v).__name__}")
    return {k: (v or None) for k, v in value.items()}


def _get(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise InputError(f"the model has no module {name!r}; give this architecture's layout (layout={{...}} or "
                         "--layout; see fastedit.models.LAYOUTS for examples)") from None


def _accessor_name(model: nn.Module, accessor: str, field: str) -> str:
    """The name of the module ``model.<accessor>()`` returns."""
    get = getattr(model, accessor, None)
    module = get() if callable(get) else None
    if isinstance(module, nn.Module):
        for name, mod in model.named_modules():
            if mod is module:
                return name
    raise InputError(f"the model's {accessor}() names no module of it; give the layout's {field} (e.g. {field}=...)")


def _config(model):
    cfg = getattr(model, "config", None)
    get_text = getattr(cfg, "get_text_config", None)
    return get_text() if callable(get_text) else cfg


def _num_hidden_layers(model) -> int | None:
    n = getattr(_config(model), "num_hidden_layers", None)
    return n if isinstance(n, int) and n > 0 else None


def _decoder_layers(model: nn.Module) -> str:
    """The block template of the model's decoder layer list: its one ModuleList of
    ``num_hidden_layers`` modules."""
    n = _num_hidden_layers(model)
    found = [name for name, mod in model.named_modules()
             if isinstance(mod, nn.ModuleList) and name and (n is None or len(mod) == n)]
    if len(found) != 1:
        raise InputError(f"cannot tell which module list holds the decoder layers (candidates: {found or 'none'}); "
                         "give the block template in the layout (block='model.layers.{}')")
    return found[0] + ".{}"


def _resolve(model: nn.Module, fields: dict) -> Layout:
    """A Layout with every module named: accessors fill the fields left None."""
    fields = dict(fields)
    missing = [k for k in ("rewrite", "final_norm") if not fields.get(k)]
    if missing:
        model_type = getattr(_config(model), "model_type", None)
        raise InputError(f"no built-in layout for model_type {model_type!r} (known: {', '.join(sorted(LAYOUTS))}); "
                         f"give the layout's {' and '.join(missing)} (e.g. layout={{'rewrite': "
                         "'model.layers.{}.mlp.down_proj', 'final_norm': 'model.norm'}, or --layout)")
    if not fields.get("block"):
        fields["block"] = _decoder_layers(model)
    if not fields.get("lm_head"):
        fields["lm_head"] = _accessor_name(model, "get_output_embeddings", "lm_head")
    if not fields.get("embed"):
        fields["embed"] = _accessor_name(model, "get_input_embeddings", "embed")
    for k in ("block", "rewrite", "post_mlp_norm"):
        if fields.get(k) is not None and "{}" not in fields[k]:
            raise InputError(f"layout field {k}={fields[k]!r} must contain {{}} where the layer index goes")
    return Layout(**{k: fields.get(k) for k in FIELDS})


_QUANT_CLASSES = ("Params4bit", "Int8Params", "Linear8bitLt", "Linear4bit", "QuantLinear", "QLinear")


def _refuse_weights(model: nn.Module, adapter: "ModelAdapter") -> None:
    """Refuse, naming the parameter, what an exact in-place edit cannot work on."""
    fix = "load the model unquantised in bfloat16 or float32 (torch_dtype=..., no load_in_8bit/4bit)"
    for name, p in model.named_parameters():
        if p.is_meta:
            raise InputError(f"parameter {name!r} is on the meta device (not loaded, or offloaded to disk/CPU by "
                             "accelerate), so it cannot be read or edited in place; load the whole model onto real "
                             "devices (device_map without 'disk'/offload, or enough max_memory)")
        if type(p).__name__ in _QUANT_CLASSES:
            raise InputError(f"parameter {name!r} is quantised ({type(p).__name__}); fastedit edits full-precision "
                             f"weights only: {fix}")
    for l in range(adapter.num_layers):
        name = adapter.rewrite_name(l)
        mod = adapter.rewrite_module(l)
        if type(mod).__name__ in _QUANT_CLASSES:
            raise InputError(f"the rewrite module {name!r} is quantised ({type(mod).__name__}); {fix}")
        w = getattr(mod, "weight", None)
        if not isinstance(w, torch.Tensor) or w.ndim != 2:
            raise InputError(f"the rewrite module {name!r} ({type(mod).__name__}) has no 2-D weight to edit; "
                             "the layout's rewrite must name a Linear (or Conv1D) MLP output projection")
        if not w.is_floating_point():
            raise InputError(f"parameter {name}.weight has dtype {w.dtype}, not a floating type (quantised?); {fix}")


def _refuse_moe(model: nn.Module) -> None:
    """Mixture-of-experts MLPs: found by their ``experts`` module or the config's expert count."""
    moe = next((name for name, _ in model.named_modules() if name.rsplit(".", 1)[-1] == "experts"), None)
    if moe is None:
        cfg = _config(model)
        field = next((k for k in ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
                      if isinstance(getattr(cfg, k, None), int) and getattr(cfg, k) > 1), None)
        if field is None:
            return
        moe = f"config.{field}={getattr(cfg, field)}"
    else:
        parent = moe.rpartition(".")[0]
        moe = f"{parent or moe} ({type(model.get_submodule(parent) if parent else model).__name__})"
    raise InputError(f"{moe} is a mixture-of-experts MLP: an update of one expert reaches only the tokens routed to "
                     "it, scaled by the router, so the edit would not be what was solved for; fastedit edits dense "
                     "MLPs only (built-in families: " + ", ".join(sorted(LAYOUTS)) + ")")


def _refuse_family(model: nn.Module) -> None:
    """Architectures where ΔW·k does not add to the residual stream the way a layout says."""
    cfg = _config(model)
    if getattr(cfg, "model_type", None) == "opt" and getattr(cfg, "do_layer_norm_before", True) is False:
        raise InputError("this OPT model normalises the residual stream after the MLP (do_layer_norm_before=False, "
                         "as OPT-350m), so a change of fc2's output is not a change of the block output; fastedit "
                         "edits pre-norm OPT models (125m, 1.3b and larger)")
    if getattr(cfg, "apply_residual_connection_post_layernorm", False):
        raise InputError("apply_residual_connection_post_layernorm=True: the residual stream is taken after the "
                         "norm, so a change of the MLP output is not a change of the block output; not supported")


class ModelAdapter:
    """Access to blocks, rewrite modules (keys/values), final norm and LM head of one model.

    ``weight(l)`` returns the rewrite weight as a (d, d_k) view of the parameter (a transposed
    view for Conv1D), so ``adapter.weight(l).add_(dW)`` edits the model in place whatever the
    storage layout. ``layout`` is fully resolved (every module named).
    """

    def __init__(self, model: nn.Module, layout: Layout | dict):
        self.model = model
        _refuse_moe(model)
        _refuse_family(model)
        self.layout = _resolve(model, load_layout(layout))
        self.num_layers = self._count_layers()
        self.flat_tokens = getattr(_config(model), "model_type", None) in _FLAT_TOKENS
        probe = self.rewrite_module(0)
        self.transposed = type(probe).__name__ == "Conv1D"
        _refuse_weights(model, self)
        w = self.weight(0)
        self.d, self.d_k = int(w.shape[0]), int(w.shape[1])
        for name in ("final_norm", "lm_head", "embed"):
            getattr(self, name)

    def _count_layers(self) -> int:
        n = _num_hidden_layers(self.model)
        if n is not None:
            _get(self.model, self.layout.block.format(n - 1))
            return n
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

    def layer_device(self, layer: int) -> torch.device:
        """Where layer ``layer``'s rewrite weight lives: its statistics, solver state and updates
        belong there (a model split over devices by ``device_map`` has several)."""
        return self.weight_param(layer).device

    def as_tokens(self, t: torch.Tensor, shape) -> torch.Tensor:
        """A rewrite module's hooked input or output as (batch, seq, width), ``shape`` = (batch,
        seq) of the forward pass: OPT feeds fc2 its tokens flattened to (batch·seq, width)."""
        if t.ndim == 3:
            return t
        if t.ndim == 2 and self.flat_tokens:
            return t.reshape(*shape, t.shape[-1])
        raise InputError(f"the rewrite module {self.layout.rewrite!r} sees a tensor of shape {tuple(t.shape)}, not "
                         f"(batch, seq, width) for a batch of shape {tuple(shape)}; give a layout whose rewrite "
                         "module takes its tokens as (batch, seq, width)")

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
        cap = getattr(_config(self.model), "final_logit_softcapping", None)
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
        """Where the token ids go: the input embedding's device (layer 0's with one device)."""
        w = getattr(self.embed, "weight", None)
        return w.device if isinstance(w, torch.Tensor) else self.layer_device(0)

    @property
    def dtype(self) -> torch.dtype:
        return self.weight_param(0).dtype

    def __repr__(self) -> str:
        return (f"ModelAdapter({type(self.model).__name__}, layers={self.num_layers}, d={self.d}, "
                f"d_k={self.d_k}, rewrite={self.layout.rewrite!r}, transposed={self.transposed})")


def get_adapter(model: nn.Module, layout=None, *, block: str | None = None, rewrite: str | None = None,
                final_norm: str | None = None, lm_head: str | None = None, embed: str | None = None,
                post_mlp_norm: str | None = None) -> ModelAdapter:
    """The adapter of ``model``.

    The layout is the built-in one of ``config.model_type`` (if any), overridden by the fields
    ``layout`` names (a :class:`Layout`, a dict, a JSON file or ``"field=template,..."``; see
    :func:`load_layout`), overridden by the keyword templates. For an architecture not in
    :data:`LAYOUTS` give at least ``rewrite`` and ``final_norm`` (and ``post_mlp_norm`` where the
    family normalises the MLP output); the rest comes from the model's accessors.
    """
    model_type = getattr(_config(model), "model_type", None)
    base = LAYOUTS.get(model_type)
    fields = base.to_dict() if base is not None else {}
    fields.update(load_layout(layout))
    given = dict(block=block, rewrite=rewrite, final_norm=final_norm, lm_head=lm_head, embed=embed,
                 post_mlp_norm=post_mlp_norm)
    fields.update({k: v for k, v in given.items() if v is not None})
    return ModelAdapter(model, fields)
