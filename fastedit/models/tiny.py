"""Small random-initialised models of the supported architectures, for tests and benchmarks.

Built from a config (no download). ``tiny_model("llama")`` gives a few-layer model; pass
config overrides (e.g. the real hidden sizes) to get the real compute shape.
"""
from __future__ import annotations

import torch

_DECODER = dict(hidden_size=48, intermediate_size=112, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128)
# Token ids inside the tiny vocabulary (pad 0, <s> 1, </s> 2, as tiny_tokenizer has them).
_IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)

# arch -> (config class, model class, defaults). The first three are the long-standing test
# models; the others are one small member of each family fastedit supports.
_ARCHS = {
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_embd=48, n_layer=4, n_head=4, n_inner=None, n_positions=128)),
    "gptj": ("GPTJConfig", "GPTJForCausalLM", dict(n_embd=48, n_layer=4, n_head=4, rotary_dim=8, n_positions=128)),
    "llama": ("LlamaConfig", "LlamaForCausalLM", _DECODER),
    "llama2": ("LlamaConfig", "LlamaForCausalLM", {**_DECODER, "num_key_value_heads": 4, **_IDS}),
    "llama3": ("LlamaConfig", "LlamaForCausalLM", {**_DECODER, "tie_word_embeddings": True, **_IDS}),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM",
                 dict(hidden_size=48, intermediate_size=112, num_hidden_layers=4, num_attention_heads=4,
                      max_position_embeddings=128, **_IDS)),
    "mistral": ("MistralConfig", "MistralForCausalLM", {**_DECODER, "head_dim": 12, "sliding_window": 16, **_IDS}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {**_DECODER, **_IDS}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {**_DECODER, "head_dim": 12, **_IDS}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {**_DECODER, "head_dim": 12, **_IDS}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",
               {**_DECODER, "head_dim": 12, "sliding_window": 16, "query_pre_attn_scalar": 12, **_IDS}),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM",
                    {**_DECODER, "head_dim": 12, "sliding_window": 16, "query_pre_attn_scalar": 12, **_IDS}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {**_DECODER, "original_max_position_embeddings": 128, **_IDS}),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {**_DECODER, **_IDS}),
    "olmo3": ("Olmo3Config", "Olmo3ForCausalLM", {**_DECODER, "sliding_window": 16, **_IDS}),
    "olmo": ("OlmoConfig", "OlmoForCausalLM", {**_DECODER, **_IDS}),
    "stablelm": ("StableLmConfig", "StableLmForCausalLM", {**_DECODER, "partial_rotary_factor": 0.5, **_IDS}),
    "phi": ("PhiConfig", "PhiForCausalLM", dict(hidden_size=48, intermediate_size=112, num_hidden_layers=4,
                                                num_attention_heads=4, max_position_embeddings=128, **_IDS)),
    "bloom": ("BloomConfig", "BloomForCausalLM", dict(hidden_size=48, n_layer=4, n_head=4, **_IDS)),
    "falcon": ("FalconConfig", "FalconForCausalLM", dict(hidden_size=48, num_hidden_layers=4, num_attention_heads=4,
                                                        **_IDS)),
    "opt": ("OPTConfig", "OPTForCausalLM", dict(hidden_size=48, ffn_dim=112, num_hidden_layers=4,
                                                num_attention_heads=4, word_embed_proj_dim=48,
                                                max_position_embeddings=128, **_IDS)),
}
#: Architectures :func:`tiny_model` builds.
ARCHS = tuple(_ARCHS)


def tiny_model(arch: str, *, vocab_size: int = 97, seed: int = 0, dtype=torch.float32, **overrides):
    """A random few-layer causal LM of ``arch`` (one of :data:`ARCHS`) in eval mode, built from a
    config (transformers is imported here); ``overrides`` are config fields."""
    import transformers

    if arch not in _ARCHS:
        raise ValueError(f"arch must be one of {sorted(_ARCHS)}, got {arch!r}")
    cfg_name, model_name, defaults = _ARCHS[arch]
    cfg = getattr(transformers, cfg_name)(**{**defaults, "vocab_size": vocab_size, **overrides})
    torch.manual_seed(seed)
    return getattr(transformers, model_name)(cfg).to(dtype).eval()


_TINY_CORPUS = (
    "The Eiffel Tower is located in Paris. Danielle Darrieux speaks French. Michael Jordan plays "
    "basketball. Toko Yasuda plays the guitar. Therefore the capital of France is Paris. Because "
    "I know you, the mother tongue of Thomas is English. You can see that Rome is in Italy."
)


def _tiny_tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    alphabet = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [chr(c) for c in range(ord("A"), ord("Z") + 1)]
    alphabet += list(".,'")
    tok = Tokenizer(models.BPE(unk_token="<unk>", continuing_subword_prefix="##"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.decoder = decoders.WordPiece(prefix="##")
    trainer = trainers.BpeTrainer(vocab_size=97, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                  initial_alphabet=alphabet, limit_alphabet=len(alphabet),
                                  continuing_subword_prefix="##", show_progress=False)
    tok.train_from_iterator([_TINY_CORPUS] * 3, trainer)
    return tok.to_str()


def tiny_tokenizer(*, bos: bool = True, padding_side: str = "right"):
    """A 97-token BPE tokenizer (sub-word splits, pad/bos/eos/unk) matching ``tiny_model``'s vocab.

    Trained deterministically on a fixed sentence list; ``bos=True`` prepends ``<s>`` as Llama's
    tokenizers do, ``bos=False`` adds nothing as GPT-2's do. Characters outside ASCII letters and
    ``.,'`` map to ``<unk>``.
    """
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    global _TINY_JSON
    if _TINY_JSON is None:
        _TINY_JSON = _tiny_tokenizer_json()
    tok = Tokenizer.from_str(_TINY_JSON)
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                           special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", padding_side=padding_side)


_TINY_JSON: str | None = None
