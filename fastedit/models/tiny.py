"""Small random-initialised models of the supported architectures, for tests and benchmarks.

Built from a config (no download). ``tiny_model("llama")`` gives a few-layer model; pass
config overrides (e.g. the real hidden sizes) to get the real compute shape.
"""
from __future__ import annotations

import torch

_DEFAULTS = {
    "gpt2": dict(n_embd=48, n_layer=4, n_head=4, n_inner=None, n_positions=128),
    "gptj": dict(n_embd=48, n_layer=4, n_head=4, rotary_dim=8, n_positions=128),
    "llama": dict(hidden_size=48, intermediate_size=112, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128),
}


def tiny_model(arch: str, *, vocab_size: int = 97, seed: int = 0, dtype=torch.float32, **overrides):
    """A random ``{gpt2, gptj, llama}`` causal LM in eval mode (transformers is imported here)."""
    import transformers

    if arch not in _DEFAULTS:
        raise ValueError(f"arch must be one of {sorted(_DEFAULTS)}, got {arch!r}")
    cfg_cls = {"gpt2": transformers.GPT2Config, "gptj": transformers.GPTJConfig,
               "llama": transformers.LlamaConfig}[arch]
    model_cls = {"gpt2": transformers.GPT2LMHeadModel, "gptj": transformers.GPTJForCausalLM,
                 "llama": transformers.LlamaForCausalLM}[arch]
    kwargs = {**_DEFAULTS[arch], "vocab_size": vocab_size, **overrides}
    cfg = cfg_cls(**kwargs)
    torch.manual_seed(seed)
    return model_cls(cfg).to(dtype).eval()
