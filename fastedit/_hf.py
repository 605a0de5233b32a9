"""What fastedit reads from Hugging Face models and tokenizers, decided in one place.

- :func:`context_length`: the longest sequence a model's config admits.
- :func:`pad_id`: the id used to pad a batch (attention masks hide it, so any valid id works).
- :func:`position_ids`: positions that count real tokens only, whatever the padding side.
- :func:`cache_argument`, :func:`output_cache`: the key/value cache's name going in and out,
  which changed between ``transformers`` releases.
"""
from __future__ import annotations

#: Config fields that state the context length, in the order they are trusted.
CONTEXT_LENGTH_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "seq_length")


def context_length(model) -> int | None:
    """The model's maximum sequence length from its config (the first of
    :data:`CONTEXT_LENGTH_KEYS` that is a positive int), or None when it states none."""
    cfg = getattr(model, "config", None)
    for key in CONTEXT_LENGTH_KEYS:
        value = getattr(cfg, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def pad_id(tokenizer) -> int:
    """The tokenizer's pad id, else its EOS id, else 0 (also for ``tokenizer=None``)."""
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return 0


def position_ids(mask):
    """(..., T) position ids from an attention mask: the number of real tokens before each one
    (``mask.cumsum(-1) − 1``, 0 on leading padding), so that a left-padded row gets the
    positions it would have alone."""
    return (mask.cumsum(-1) - 1).clamp_min(0)


def cache_argument(model) -> str:
    """The name of the forward argument that takes a key/value cache: ``cache`` in newer
    ``transformers`` releases, ``past_key_values`` before (still accepted there, with a warning)."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def output_cache(out):
    """The key/value cache a forward returned (``out.cache``, or ``out.past_key_values`` before)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values
