"""The testbed tokenizer: a small byte-level BPE trained on the world's vocabulary.

Byte-level like GPT-2 and Llama 3, so " Paris" (with its leading space) is one token and the
editing code's " " + target convention holds. Made-up names split into syllable pieces.
"""
from __future__ import annotations

from fastedit.errors import InputError

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"


def build_tokenizer(corpus, vocab_size: int = 1024):
    """Train a byte-level BPE of ``vocab_size`` tokens on an iterable of strings and wrap it
    as a ``transformers.PreTrainedTokenizerFast`` with bos/eos/pad tokens.

    The tokenizer prepends BOS to every encoded text (as Llama's does), so a prompt's first
    real token is never position 0 and the editing code sees the BOS handling of real models.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 300:
        raise InputError(f"vocab_size must be at least 300 (256 bytes + specials + merges), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS, PAD],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(corpus, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS,
                                   pad_token=PAD, model_max_length=256)
    return fast
